"""Run one real training step on fake tensors and record the peak of live tensor bytes.

Nothing is computed and nothing is allocated: under `FakeTensorMode` every op only produces the shape,
dtype and device of its result. A `TorchDispatchMode` sees each op's outputs and counts every new tensor
storage until Python frees it, which is what an allocator has to hold (torch's `MemTracker` does the
same with module bookkeeping that costs ~20x the time; we need only the total and a few categories).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary, weakref

from lmtune.head import hidden_states_for_head
from lmtune.memory.tasks import StepShape

_CHECK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("lmtune_trace_check", default=None)


@contextlib.contextmanager
def checked(check: Callable[[], None]) -> Iterator[None]:
    """Call `check` before every traced op in this thread; what it raises stops the trace (a caller's time limit,
    or a newer request that supersedes this one)."""
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of distinct tensor storages alive, and their peak."""

    def __init__(self, on_peak: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._on_peak = on_peak

    def add(self, tensor: torch.Tensor) -> None:
        """Count a tensor made outside the mode (the weights) or by an op inside it."""
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        weakref.finalize(storage, self._free, size)
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            if self._on_peak is not None:
                self._on_peak()

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        check = _CHECK.get()
        # Not at prim ops (`prim.device` and the like): C++ asks for them where it lets no exception through, and a
        # stop raised there aborts the whole process ("terminate called after throwing ... python_error").
        if check is not None and func.namespace != "prim":
            check()
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out


@dataclass
class StepTrace:
    """Bytes found by tracing one steady-state training step (the optimizer state already exists)."""

    peak: int
    """Most bytes alive at once during forward, loss, backward, clipping and the optimizer step."""
    weights: int
    """Parameters and buffers (each shared tensor once)."""
    optimizer: int
    """Optimizer state."""
    gradients_at_peak: int
    """Gradients alive at the moment of the peak (all trainable gradients when the peak is in the step)."""
    saved_for_backward: int
    """Activations alive after the forward pass and the loss (what backward will read), logits included."""
    reference_weights: int = 0
    """A frozen reference copy (GRPO with a method that cannot switch itself off)."""


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen.setdefault(storage._cdata, storage.nbytes())
    return sum(seen.values())


# Traces may run in several threads at once (the studio starts a new estimate while a superseded one winds down),
# so the transformers functions below are wrapped once and for good, and each wrapper reads its trace's setting
# from a context variable (one per thread): outside a trace it is the original function. Swapping a function in
# and back per trace would let two overlapping traces restore each other's wrapper and leave it in place.
_KEEP_COUNT: contextvars.ContextVar[int | None] = contextvars.ContextVar("lmtune_keep_count", default=None)
_ONE_SEQUENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("lmtune_one_sequence", default=False)


def _wrap_once(module, name: str, wrapper_for: Callable[[Callable], Callable]) -> None:
    original = getattr(module, name)
    if not getattr(original, "_lmtune_trace_wrapper", False):
        wrapper = wrapper_for(original)
        wrapper._lmtune_trace_wrapper = True
        setattr(module, name, wrapper)


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _select_kept(original: Callable) -> Callable:
    def select(hidden: torch.Tensor, keep):
        count = _KEEP_COUNT.get()
        if count is not None and isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.ndim == 2:
            return hidden.flatten(0, 1).index_select(0, torch.arange(count, device=hidden.device))
        return original(hidden, keep)
    return select


@contextlib.contextmanager
def keep_positions(model: torch.nn.Module, count: int) -> Iterator[None]:
    """Make a boolean `logits_to_keep` select its first `count` positions without reading the mask.

    A boolean index has a data-dependent size, which fake tensors cannot know; the count is known here.
    `index_select` copies as boolean indexing does, and its backward scatters into zeros as index_put does.
    """
    for module in {sys.modules[type(m).__module__] for m in model.modules()}:
        if hasattr(module, "slice_logits_to_keep"):
            _wrap_once(module, "slice_logits_to_keep", _select_kept)
    with _set(_KEEP_COUNT, count):
        yield


def _no_packing_when_one_sequence(original: Callable) -> Callable:
    def find(position_ids):
        return None if _ONE_SEQUENCE.get() else original(position_ids)
    return find


@contextlib.contextmanager
def one_sequence_per_row(active: bool) -> Iterator[None]:
    """Rows with no padding and no packing hold one sequence each. transformers checks that on the position ids
    to skip the attention mask (SDPA runs `is_causal`); fake tensors have no values, so it would assume packing
    and build an s x s mask, with a float copy per layer in SDPA (16 MiB a layer at 2,048 tokens), which the
    real run never allocates."""
    from transformers import masking_utils

    _wrap_once(masking_utils, "find_packed_sequence_indices", _no_packing_when_one_sequence)
    with _set(_ONE_SEQUENCE, active):
        yield


def token_logps_loss(model: torch.nn.Module, input_ids: torch.Tensor, keep: torch.Tensor, count: int,
                     autocast: contextlib.AbstractContextManager, padded: bool = True) -> torch.Tensor:
    """The SFT objective's memory path: LM head on the kept positions, fp32 cross-entropy summed.

    `padded`: a batch with padding has an attention mask, from which transformers builds a 4-D mask (fake
    tensors cannot tell it is all ones, and a padded batch's is not); packed batches run causal with none.
    """
    mask = torch.ones_like(input_ids) if padded else None
    with autocast, hidden_states_for_head(model) as head:  # the objective's chunked head
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
    if logits.dim() == 3:  # a model that ignores logits_to_keep returns every position
        logits = logits[:, :-1].flatten(0, 1)
        count = logits.shape[0]
    targets = torch.zeros(count, dtype=torch.long, device=logits.device)
    if head is not None:
        return -head.logps(logits, targets).sum()
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _optimizer(params: list[torch.nn.Parameter], name: str, foreach: bool) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=foreach)
    return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)  # 8-bit AdamW: fp32 traced, bytes swapped later


def trace_step(model: torch.nn.Module, shape: StepShape, *, optimizer: str, autocast_dtype: torch.dtype | None,
               foreach: bool, clip: bool, padded: bool = True, packed: bool = False) -> StepTrace:
    """Trace the second training step of `model` (already built under FakeTensorMode, method applied) on one
    micro-batch of `shape` (tasks.py): forward, loss, backward, clipping, the optimizer step. `padded`: the
    rows carry padding (an attention mask); `packed`: several sequences per row (restarting position ids)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # optimizer state is created by the first step; the peak is a later one
        p.grad = torch.zeros_like(p)
    first = _optimizer(trainable, optimizer, foreach=True)
    first.step()  # foreach: few ops to fake, the same state
    opt = _optimizer(trainable, optimizer, foreach)
    opt.state.update(first.state)  # not load_state_dict: that would copy the foreach choice too
    for p in trainable:
        p.grad = None
    grads_at_peak = [0]

    def on_peak() -> None:
        grads_at_peak[0] = storage_bytes(p.grad for p in trainable if p.grad is not None)

    tracker = LiveBytes(on_peak)
    weights = storage_bytes([*model.parameters(), *model.buffers()])
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in [*model.parameters(), *model.buffers(), *state]:
        tracker.add(t)
    device = trainable[0].device.type if trainable else "cpu"
    autocast = (torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    count = shape.rows * shape.labelled
    with tracker, keep_positions(model, count), one_sequence_per_row(not padded and not packed):
        input_ids = torch.zeros(shape.rows, shape.seq_len, dtype=torch.long, device=device)
        keep = torch.zeros(shape.rows, shape.seq_len, dtype=torch.bool, device=device)
        if shape.score_head:
            loss = _score_loss(model, input_ids, autocast)
        elif shape.kl_rows:  # data.preserve.kl: objectives.sft_kl_loss
            loss = _kl_loss(model, input_ids, keep, count, autocast, padded, shape.kl_rows)
        else:  # the policy's forward first: a reference pass runs while its graph is alive (objectives.dpo_loss)
            loss = token_logps_loss(model, input_ids, keep, count, autocast, padded)
        if shape.reference:
            loss = loss + _reference_logps(model, input_ids, keep, count, autocast, padded).sum()
        saved = tracker.live
        loss.backward()
        del loss
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt_bytes = storage_bytes(state)
    return StepTrace(peak=tracker.peak, weights=weights, optimizer=opt_bytes, gradients_at_peak=grads_at_peak[0],
                     saved_for_backward=saved - weights - opt_bytes,
                     reference_weights=weights if shape.copy_weights else 0)


def _score_loss(model, input_ids, autocast) -> torch.Tensor:
    """The reward model's path: the body's last hidden states, the scalar head on each row's last token."""
    from lmtune.rl.reward_model import scores

    with autocast:
        return scores(model, input_ids, torch.ones_like(input_ids)).sum()


def _kl_loss(model, input_ids, keep, count, autocast, padded: bool, rows: int) -> torch.Tensor:
    """objectives.sft_kl_loss's memory path: full-vocabulary fp32 logits at every kept position (no chunked head)
    and their cross-entropy, then a no-grad reference pass (method switched off) on the `rows` anchored rows and
    the KL between the two log-softmaxes at their positions."""
    mask = torch.ones_like(input_ids) if padded else None
    with autocast:
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits.float()
    nll = F.cross_entropy(logits, torch.zeros(count, dtype=torch.long, device=logits.device), reduction="sum")
    anchored = count * rows // input_ids.shape[0]  # the kept positions of the anchored rows
    with _methods_off(model), torch.no_grad(), _set(_KEEP_COUNT, anchored):
        with autocast:
            ref = model(input_ids=input_ids[:rows], attention_mask=None if mask is None else mask[:rows],
                        logits_to_keep=keep[:rows]).logits
        ref_logps = F.log_softmax(ref.float(), dim=-1)
        del ref
    index = torch.arange(anchored, device=logits.device)  # boolean indexing in the objective: a copy
    logps = F.log_softmax(logits.index_select(0, index), dim=-1)
    return nll + F.kl_div(logps, ref_logps, log_target=True, reduction="sum")


@contextlib.contextmanager
def _methods_off(model) -> Iterator[None]:
    """The reference's model: every method module switched off (none to switch for full / freeze, whose
    reference costs the same activations)."""
    switches = [m for m in model.modules() if hasattr(m, "disabled")]
    for m in switches:
        m.disabled = True
    try:
        yield
    finally:
        for m in switches:
            m.disabled = False


def _reference_logps(model, input_ids, keep, count, autocast, padded: bool) -> torch.Tensor:
    """The reference pass (DPO, GRPO): the model with its method switched off, no graph; only per-token
    log-probabilities survive."""
    with _methods_off(model), torch.no_grad():
        return token_logps_loss(model, input_ids, keep, count, autocast, padded).reshape(1)
