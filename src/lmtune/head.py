"""Log-probabilities of target tokens through the LM head, a chunk of rows at a time.

The (labelled tokens x vocabulary) fp32 logits, their log-softmax and the gradient of each are, with a 49k
vocabulary, the largest tensors of a small model's training step. Here they exist one chunk at a time:
the forward keeps per token only its log-sum-exp and, for a frozen head, the expected output embedding
E_p[W] (a hidden-size vector: the head's input gradient is g * (W[target] - E_p[W])), so the backward needs no
logits at all. A head that trains (full fine-tuning) recomputes each chunk's logits in the backward instead.
The matmuls are the same as a plain head's (forward and input gradient), the memory traffic is not.

The model runs with its output embedding switched to the identity (its `.logits` are then the final hidden
states of the kept positions). Whether that is exact for a model (no logit scaling or soft-capping after the
head) is seen on its first call, and a model where it is not is run again, and from then on, the plain way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

CHUNK_ELEMENTS = 2**23
"""Logits per chunk (32 MB in fp32): rows = CHUNK_ELEMENTS // vocabulary size."""


class _HeadLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, want_grad: bool):  # noqa: ANN001, ANN205 (autograd API)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        n = hidden.shape[0]
        logps = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
        frozen_head = not (weight.requires_grad or (bias is not None and bias.requires_grad))
        expected = torch.empty_like(hidden) if want_grad and frozen_head else None
        for start in _chunk_starts(hidden, rows):
            part = slice(start, start + rows)
            logits = F.linear(hidden[part], weight, bias)
            # One fused log-softmax in fp32 (fewer passes over the chunk than logsumexp, subtract and exp);
            # the log-sum-exp the backward needs follows from the target's logit and log-prob.
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            target = targets[part, None]
            logps[part] = logp.gather(1, target).squeeze(1)
            lse[part] = logits.gather(1, target).squeeze(1).float() - logps[part]
            if expected is not None:
                expected[part] = logp.exp_().to(weight.dtype) @ weight
        ctx.recompute = not frozen_head
        device = hidden.device.type
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, expected)
        return logps

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        hidden, weight, bias, targets, lse, expected = ctx.saved_tensors
        if not ctx.recompute:  # d logp / d hidden = W[target] - E_p[W]
            grad_hidden = (weight[targets] - expected) * grad[:, None].to(expected.dtype)
            return grad_hidden, None, None, None, None
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for start in _chunk_starts(hidden, rows):
            part = slice(start, start + rows)
            with torch.autocast(hidden.device.type, dtype=ctx.autocast, enabled=ctx.autocast is not None):
                logits = F.linear(hidden[part], weight, bias).float()  # as the forward computed them
            # d logp / d logits = onehot(target) - softmax
            dlogits = logits.sub_(lse[part, None]).exp_().mul_(-grad[part, None])
            dlogits[torch.arange(dlogits.shape[0], device=dlogits.device), targets[part]] += grad[part]
            if grad_hidden is not None:
                grad_hidden[part] = dlogits.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += dlogits.T @ hidden[part].float()
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _chunk_starts(hidden: torch.Tensor, rows: int) -> range | list[int]:
    """Where each chunk starts. Traced on fake tensors (the memory estimate), the first two chunks and the last
    stand for all: each chunk allocates and frees the same buffers (the peak is two chunks' logits, the old one
    alive while the new one is made), and a 10**8-row batch would otherwise trace millions of chunks."""
    from torch._subclasses.fake_tensor import is_fake

    starts = range(0, hidden.shape[0], rows)
    return [starts[0], starts[1], starts[-1]] if len(starts) > 3 and is_fake(hidden) else starts


def head_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) under `head(hidden[i])`, for (tokens x hidden) `hidden`, in fp32."""
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _HeadLogps.apply(hidden, head.weight, head.bias, targets, want_grad)


def _causal_lm(model: nn.Module) -> PreTrainedModel | None:
    """The transformers model inside a TunedModel / DDP wrapper (the outermost PreTrainedModel)."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


class ChunkedHead:
    """The model's head while it passes its input through (see `hidden_states_for_head`)."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        self.passed: torch.Tensor | None = None  # what the identity head returned
        self.autocast: torch.dtype | None = None  # the autocast the model's forward ran under, if any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            self.autocast = torch.get_autocast_dtype(x.device.type)
        self.passed = x
        return x

    def confirm(self, logits: torch.Tensor) -> bool:
        """Whether the model returned the head's input untouched (no logit scaling or soft-capping after the head:
        those would have been applied to the hidden states). Learned on a model's first call, then remembered."""
        known = getattr(self.linear, "_lmtune_head_is_last", None)
        if known is None:
            known = logits is self.passed
            self.linear._lmtune_head_is_last = known
        return known

    def logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`head_logps` under the autocast the head would have run under inside the model."""
        if self.autocast is None:
            return head_logps(hidden, self.linear, targets)
        with torch.autocast(hidden.device.type, dtype=self.autocast):
            return head_logps(hidden, self.linear, targets)


@contextmanager
def hidden_states_for_head(model: nn.Module) -> Iterator[ChunkedHead | None]:
    """Inside, the model's output embedding is the identity: `.logits` are the final hidden states of the kept
    positions, and a `ChunkedHead` is yielded; its `confirm(logits)` says whether they are exactly that. None
    (and nothing changed) for a head that is not a plain Linear or a model known to change its logits."""
    causal = _causal_lm(model)
    linear = causal.get_output_embeddings() if causal is not None else None
    if type(linear) is not nn.Linear or getattr(linear, "_lmtune_head_is_last", True) is False:
        yield None
        return
    head = ChunkedHead(linear)
    linear.forward = head  # an instance attribute shadows the class's forward
    try:
        yield head
    finally:
        del linear.forward
