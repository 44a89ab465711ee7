"""The estimate as the user sees it, the memory a device has free, and the pre-flight check of `lmtune train`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmtune.data.format import IGNORE
from lmtune.errors import LmtuneError
from lmtune.memory.allocator import configure_allocator
from lmtune.memory.core import _MODEL_DTYPE_PRECISION, Estimate, MemoryPlan, estimate
from lmtune.precision import resolve as resolve_precision
from lmtune.precision import train_device
from lmtune.tasks import get_task

GIB = 2**30
_OPTIMIZER_STATES = {"adamw": "AdamW m and v", "adamw-8bit": "8-bit AdamW m and v", "sgd": "SGD: none"}


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_estimate(est: Estimate) -> str:
    """The seed's breakdown: weights, gradients, optimizer states, activations, overhead, peak."""
    p = est.plan
    method = p["method"]["name"] if isinstance(p["method"], dict) else p["method"]
    trainable = est.trainable_params
    lines = [
        (f"memory estimate for {p['model'] or 'SmolLM2-135M-Instruct'}, method {method}, "
        f"{p['batch_size']} x {p['seq_len']} tokens ({p['labelled_fraction']:.0%} labelled), {p['precision']}, "
        f"{p['optimizer']}{', gradient checkpointing' if p['gradient_checkpointing'] else ''}"
        f"{', ' + p['quantization'] + ' base' if p['quantization'] != 'none' else ''}, task {p['task']}, "
        f"{p['devices']} x {p['device']}"),
        (f"  parameters        {est.total_params:,} ({trainable:,} trainable, "
        f"{100 * trainable / max(est.total_params, 1):.2f}%)"),
        f"  weights           {_gib(est.weights)}   {est.weights / max(est.total_params, 1):.2f} B per parameter",
        f"  gradients         {_gib(est.gradients)}   alive at the peak (trainable parameters only)",
        (f"  optimizer states  {_gib(est.optimizer)}   {_OPTIMIZER_STATES[p['optimizer']]}, "
        f"{est.optimizer / max(trainable, 1):.2f} B per trainable parameter"),
        (f"  activations       {_gib(est.activations)}   at the peak, incl. logits and loss buffers; "
        f"{est.saved_for_backward / GIB:.2f} GiB saved by the forward pass"),
        f"  overhead          {_gib(est.overhead)}   runtime memory that holds no tensor ({p['device']})",
        f"  peak per device   {_gib(est.per_device)}",
    ]
    if p["devices"] > 1:
        lines.append(f"  all devices       {_gib(est.total)}")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


def available_memory(device: str) -> int:
    """Bytes free for a new run: MemAvailable on the CPU, the free memory of the current GPU."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_from_config(cfg) -> MemoryPlan:
    """The plan of a `RunConfig`; options the config does not have yet keep their defaults."""
    train, data, model = cfg.train, cfg.data, cfg.model
    device = train_device(cfg)
    return MemoryPlan(
        model=model.name, method=cfg.method, batch_size=train.batch_size, seq_len=data.max_length,
        precision=resolve_precision(cfg)[0] if hasattr(train, "precision") else _MODEL_DTYPE_PRECISION[model.dtype],
        optimizer=getattr(train, "optimizer", "adamw"),
        gradient_checkpointing=bool(getattr(train, "gradient_checkpointing", False)),
        quantization=getattr(model, "quantization", None) or "none",
        packing=bool(getattr(data, "packing", False)),
        preserve_kl=bool(getattr(data, "preserve", None) and data.preserve.prompts and data.preserve.kl),
        task=get_task(cfg.task).memory_shape, group_size=cfg.grpo.group_size,
        max_new_tokens=cfg.grpo.max_new_tokens, kl_beta=cfg.grpo.beta, device=device,
        devices=int(os.environ.get("WORLD_SIZE", "1")), clip_grad=train.max_grad_norm is not None,
        trust_remote_code=model.trust_remote_code)


def suggestions(plan: MemoryPlan, cfg) -> list[str]:
    """Concrete changes that lower the peak, each one the config can express."""
    out = []
    method = getattr(plan.method, "name", plan.method)
    if method in ("full", "freeze"):
        out.append("method=lora")
    if plan.batch_size > 1:
        out.append(f"train.batch_size={max(1, plan.batch_size // 2)} with "
                   f"train.grad_accum={2 * cfg.train.grad_accum}")
    if plan.task == "grpo" and plan.group_size > 2:  # rows = prompts x group size: the largest factor
        out.append(f"grpo.group_size={max(2, plan.group_size // 2)}")
    out.append(f"data.max_length={max(2, plan.seq_len // 2)}")
    if hasattr(cfg.train, "gradient_checkpointing") and not plan.gradient_checkpointing:
        out.append("train.gradient_checkpointing=true")
    if hasattr(cfg.model, "quantization") and plan.quantization != "4bit" and method not in ("full", "freeze"):
        out.append("model.quantization=4bit")
    return out


@dataclass
class Preflight:
    """The pre-flight estimate of a run, and where its memory stood when it started (for `check` at the end)."""

    text: str
    """The report to log."""
    predicted: int | None = None
    """The peak the measurement is compared with: the whole estimate on CPU (resident set above the start),
    the tensor part on CUDA (what `torch.cuda.max_memory_allocated` counts). The worst case at
    data.max_length until `fit_to_data` narrows it to the longest batch the data can make."""
    start: int = 0
    """Resident bytes of this process when the run started (CPU)."""
    plan: MemoryPlan | None = None
    worst_case: int | None = None
    """`predicted` at data.max_length, every position labelled (what the refusal is decided on)."""
    predicted_for: str = "worst case at data.max_length"
    extra: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([self.text, *self.extra])

    def fit_to_data(self, items: list, eval_items: list = ()) -> None:
        """Estimate again for the longest micro-batch `items` (the training set) can make and the token ids the
        data holds, so that the end of the run compares its peak with the run it was, not with every row padded
        to data.max_length and every embedding row read."""
        if self.plan is None or self.predicted is None or not items:
            return
        seq_len, labelled = longest_batch(items, self.plan.batch_size)
        seq_len = min(seq_len, self.plan.seq_len)
        learned_counts = self.plan.task not in ("grpo", "reward")  # their rows' labels are not what the head sees
        labelled = labelled if learned_counts and labelled > 0 else self.plan.labelled_fraction
        # GRPO also looks up the tokens it samples, which no one knows before the run.
        ids = None if self.plan.task == "grpo" else tuple(sorted(token_ids([*items, *eval_items])))
        fitted = replace(self.plan, seq_len=max(seq_len, 2), labelled_fraction=min(labelled, 1.0), token_ids=ids)
        if fitted == self.plan:
            return  # the data fills data.max_length: the worst case is this data's case
        try:
            est = estimate(fitted)
        except Exception:  # noqa: BLE001  (as in `preflight`: the estimator never stops a run)
            return
        if _compared(est, self.plan.device) == self.predicted:
            return
        self.predicted = _compared(est, self.plan.device)
        self.predicted_for = (f"this data's longest batch, {self.plan.batch_size} x {seq_len} tokens"
                              + (f", {labelled:.0%} labelled" if learned_counts else "")
                              + (f", {len(ids):,} distinct tokens" if ids is not None else ""))
        self.extra.append(f"  for {self.predicted_for}: {_gib(est.per_device).strip()} per device "
                          f"(the worst case above pads every row to data.max_length={self.plan.seq_len})")

    def check(self, device: torch.device) -> dict:
        """The measured peak next to the prediction: logged, and returned for summary.json."""
        if device.type == "cuda":
            measured, of = torch.cuda.max_memory_allocated(device), "cuda allocated"
        else:
            measured, of = resident_bytes("VmHWM") - self.start, "process resident set above the run's start"
        out = {"measured_peak_bytes": measured, "measured_peak_of": of, "predicted_peak_bytes": self.predicted,
               "predicted_peak_for": self.predicted_for, "predicted_worst_case_bytes": self.worst_case}
        if self.predicted and measured > 0:
            out["peak_error_pct"] = round(100 * (self.predicted - measured) / measured, 1)
            logging.getLogger("lmtune").info(
                "peak memory: %.2f GiB measured (%s), %.2f GiB predicted for %s (%+.1f%%)%s", measured / GIB, of,
                self.predicted / GIB, self.predicted_for, out["peak_error_pct"],
                "" if self.worst_case == self.predicted else
                f"; worst case at data.max_length {self.worst_case / GIB:.2f} GiB")
        return out


def longest_batch(items: list, batch_size: int) -> tuple[int, float]:
    """(padded length, labelled fraction) that bound every micro-batch of `items`: batches pad to their
    longest row, so no batch is longer than the longest row, and none has more labelled positions than the
    rows with the most (pairs put chosen and rejected in one batch: 2 rows an item)."""
    rows = [row for item in items for row in _rows(item)]
    longest = max(length for length, _ in rows)
    per_batch = batch_size * max(len(_rows(items[0])), 1)
    most = sorted((labelled for _, labelled in rows), reverse=True)[:per_batch]
    return longest, min(1.0, sum(most) / (per_batch * max(longest - 1, 1)))


def token_ids(items: list) -> set[int]:
    """The distinct token ids of `items` (examples, pairs, packed rows, prompts)."""
    out: set[int] = set()
    for item in items:
        for seq in _sequences(item):
            out.update(seq.input_ids)
    return out


def _sequences(item) -> list:
    if hasattr(item, "chosen"):
        return [item.chosen, item.rejected]
    return list(getattr(item, "examples", [item]))


def _rows(item) -> list[tuple[int, int]]:
    """(tokens, learned positions) of each row an item puts in a batch."""
    if hasattr(item, "chosen"):  # a preference pair
        return _rows(item.chosen) + _rows(item.rejected)
    if hasattr(item, "examples"):  # a packed row: its examples end to end
        parts = [r for e in item.examples for r in _rows(e)]
        return [(sum(n for n, _ in parts), sum(k for _, k in parts))]
    labels = getattr(item, "labels", None) or []  # a GRPO prompt has none: its completions are sampled
    return [(len(item.input_ids), sum(label != IGNORE for label in labels[1:]))]


def _compared(est: Estimate, device: str) -> int:
    return est.per_device - est.overhead if device == "cuda" else est.per_device


def resident_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc; ru_maxrss where there is no /proc."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _reset_peak() -> None:
    """Start VmHWM over at the current resident set, so that a run measures its own peak (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # no reset: the peak may include an earlier run's in this process


def _check_completions(plan: MemoryPlan) -> None:
    """GRPO samples up to grpo.max_new_tokens after every prompt: refused before anything loads when that alone
    passes the model's positions (`check_lengths` checks prompt + completion once the data is read)."""
    from lmtune.memory.core import load_model_config
    from lmtune.models import position_limit

    try:
        limit = position_limit(load_model_config(plan.model, plan.trust_remote_code))
    except LmtuneError:
        return  # a model that cannot be read is reported by the loader
    if limit is not None and plan.max_new_tokens >= limit:
        raise LmtuneError(f"grpo.max_new_tokens={plan.max_new_tokens} leaves no room for a prompt in this model's "
                          f"{limit} positions; set grpo.max_new_tokens<{limit} (prompt + completion must fit)")


def preflight(cfg) -> Preflight:
    """Estimate `cfg`'s run and refuse it (LmtuneError) when it will not fit, unless `force`.

    Runs before anything is loaded; returns the report for the caller to log once the data has loaded
    (a bad record must fail as one line, with nothing logged before it), and to `check` at the end.
    Sets the allocator up first (allocator.py), so that the process's peak is the one estimated.
    """
    configure_allocator()
    _reset_peak()
    start, plan = resident_bytes("VmRSS"), plan_from_config(cfg)
    if plan.task == "grpo":
        _check_completions(plan)
    try:
        est = estimate(plan)
    except Exception as err:  # noqa: BLE001  (the estimator must never be the reason a run cannot start;
        # a wrong model name is reported by the loader that follows, a model fake tensors cannot run here)
        return Preflight("memory estimate unavailable "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); no pre-flight check", start=start)
    text = (format_estimate(est)
            + "\n  (sequences padded to data.max_length, every position labelled: the worst case)")
    free = available_memory(plan.device)
    if est.per_device > free:
        message = (f"this run needs about {est.per_device / GIB:.2f} GiB per device but {plan.device} has "
                   f"{free / GIB:.2f} GiB available; try {', '.join(suggestions(plan, cfg))} "
                   f"(lmtune estimate shows the effect), or set force=true to train anyway")
        if not getattr(cfg, "force", False):
            raise LmtuneError(message)
        text += "\n" + message.replace(", or set force=true to train anyway", "; training anyway (force=true)")
    predicted = _compared(est, plan.device)
    return Preflight(text, predicted, start, plan, predicted)
