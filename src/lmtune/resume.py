"""Resumable training checkpoints, and the guards that keep a run's progress safe.

A training checkpoint is `OUTPUT_DIR/checkpoints/step-NNNNNNNN/` holding everything the next step needs:
every trainable parameter by name (`trainable.safetensors`; for full / freeze that is the whole model, for
prompt methods their encoders), the optimizer state (`optimizer.safetensors` + JSON), the scheduler, the
RNG states (torch, CUDA, Python, NumPy), the step, the run's config and its metrics so far (`state.json`,
`metrics.jsonl`). The data position is the step: a resumed run replays the seeded data order up to it.
A checkpoint is written into a temporary directory and renamed into place, so a killed run leaves either
a whole checkpoint or none; only safetensors and JSON are ever read back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from lmtune.checkpoint import RUN_INFO
from lmtune.config import RunConfig
from lmtune.errors import LmtuneError
from lmtune.models import position_limit

CHECKPOINTS = "checkpoints"
STATE = "state.json"
_TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
_PREFIX = "step-"
# Keys that may change between a run and its resumption: they do not change what is trained.
_RESUMABLE_CHANGES = {"resume", "overwrite", "output_dir", "train.save_every", "train.keep_checkpoints",
                      "train.log_every", "train.eval_every", "train.device", "train.gradient_checkpointing"}


# ---- where a run starts -------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(_PREFIX)))


def resume_point(cfg: RunConfig, out: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start; refuses to discard progress."""
    if cfg.resume == "never":
        if checkpoints(out) and not cfg.overwrite:
            raise LmtuneError(f"{out} holds checkpoints of an unfinished run; resume it (resume=auto), or set "
                              "overwrite=true to start over")
        return None
    if cfg.resume == "auto":
        # A finished run's checkpoints are not resumed: reaching here, overwrite=true asked to start over.
        found = [] if (out / RUN_INFO).exists() else checkpoints(out)
        source = found[-1] if found else None
    else:
        source = Path(cfg.resume)
        if not (source / STATE).is_file():
            found = checkpoints(source) if source.is_dir() else []
            if not found:
                raise LmtuneError(f"resume: {source} is not a checkpoint or a run directory with checkpoints; "
                                  f"give a {CHECKPOINTS}/{_PREFIX}N directory, or resume=auto")
            source = found[-1]
    if source is not None:
        _check_same_run(cfg, source)
        for name in _TENSOR_FILES:  # headers and sizes now, before anything is loaded or written
            _unreadable(source / name, lambda path: safe_open(path, "pt").keys())
    return source


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_run(cfg: RunConfig, source: Path) -> None:
    """A checkpoint continues only the run it came from: every key that shapes training must match."""
    saved = _flat(_read_state(source)["config"])
    now = _flat(cfg.model_dump(mode="json"))
    for key in sorted(saved.keys() | now.keys()):
        if key not in _RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise LmtuneError(f"resume: {source} was trained with {key}={saved.get(key)!r} but this config says "
                              f"{now.get(key)!r}; use the run's config, or resume=never with a new output_dir")


def _read_state(directory: Path) -> dict:
    try:
        state = json.loads((directory / STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LmtuneError(f"resume: cannot read {directory / STATE} ({err}); resume from an earlier "
                          "checkpoint or start over with resume=never") from None
    if not isinstance(state, dict) or not {"step", "config", "scheduler"} <= state.keys():
        raise LmtuneError(f"resume: {directory / STATE} is not an lmtune checkpoint; resume from an earlier one")
    return state


def prepare(out: Path, source: Path | None) -> None:
    """Tidy the checkpoints of `out` for this run and restore its metrics so far (after `out` is locked)."""
    root = out / CHECKPOINTS
    if root.is_dir():
        for stale in root.glob(".tmp-*"):  # what a killed run was writing
            shutil.rmtree(stale, ignore_errors=True)
    if source is None:
        shutil.rmtree(root, ignore_errors=True)  # a fresh start (overwrite) owns no earlier checkpoints
        return
    if source.parent.resolve() != root.resolve():
        shutil.rmtree(root, ignore_errors=True)  # continuing another run's checkpoint: this lineage only
    step = int(source.name.removeprefix(_PREFIX))
    for later in checkpoints(out):  # resuming an earlier checkpoint abandons the later ones
        if int(later.name.removeprefix(_PREFIX)) > step:
            shutil.rmtree(later)
    shutil.copyfile(source / "metrics.jsonl", out / "metrics.jsonl")


# ---- saving and restoring -------------------------------------------------------------------------------

@dataclass
class Start:
    """Where the loop begins: after `step` optimizer steps, with `summary` so far and RNG states to restore."""

    step: int = 0
    summary: dict = field(default_factory=dict)
    rng: dict | None = None
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def replay(self, batches: Iterator, grad_accum: int) -> None:
        """Draw the micro-batches the interrupted run had used, then put every RNG where that run had it."""
        if self.rng is None:
            return
        for _ in range(self.step * grad_accum):
            next(batches)
        torch.set_rng_state(self.rng_tensors["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([self.rng_tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
        version, internal, gauss = self.rng["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = self.rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by module path: generic over methods (adapters, prompt encoders, all)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer state as safetensors tensors plus JSON (no pickle)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _rng_files() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def _write(path: Path, data: bytes) -> None:
    """Write and fsync: errors such as a full disk surface here, not as a silently short file."""
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None  # name the file in the message


def save_checkpoint(out: Path, step: int, cfg: RunConfig, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, summary: dict, keep: int) -> Path:
    """Write the resumable state after optimizer step `step` atomically, then keep only the last `keep`."""
    weights = trainable_state(model)
    if not all(bool(torch.isfinite(t).all()) for t in weights.values()):  # inf gradients, unclipped
        raise LmtuneError(f"the weights became NaN or infinite at step {step}; {_last_good(out)}; "
                          "lower train.lr, set train.max_grad_norm, or check the data")
    root = out / CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        optim_tensors, optim_json = _optimizer_files(optimizer)
        rng_tensors, rng_json = _rng_files()
        _write(tmp / "trainable.safetensors", save_bytes(weights, metadata={"format": "pt"}))
        _write(tmp / "optimizer.safetensors", save_bytes(optim_tensors))
        _write(tmp / "rng.safetensors", save_bytes(rng_tensors))
        shutil.copyfile(out / "metrics.jsonl", tmp / "metrics.jsonl")
        state = {"step": step, "config": cfg.model_dump(mode="json"), "optimizer": optim_json, "rng": rng_json,
                 "scheduler": scheduler.state_dict(),
                 "summary": summary}
        _write(tmp / STATE, json.dumps(state).encode())  # last: a directory without it is not a checkpoint
        if final.exists():  # re-saving a step (a resumed run's last): swap, never leave neither
            old = root / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_if_due(out: Path, step: int, steps: int, cfg: RunConfig, accelerator: Any, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, summary: dict, force: bool = False) -> None:
    """Checkpoint every `train.save_every` steps, after the last one and when `force`d (main process only)."""
    from lmtune.distributed import gathered

    every = cfg.train.save_every
    if not (force or step == steps or (every and step % every == 0)):
        return
    with gathered(accelerator, model, optimizer) as (whole, whole_optimizer):  # every process: FSDP gathers
        if accelerator.is_main_process:
            save_checkpoint(out, step, cfg, whole, whole_optimizer, scheduler,
                            {k: v for k, v in summary.items() if k != "steps"}, cfg.train.keep_checkpoints)


def _unreadable(path: Path, read: Any) -> Any:
    try:
        return read(path)
    except (OSError, SafetensorError) as err:
        raise LmtuneError(f"resume: cannot read {path} ({err}); resume from an earlier checkpoint "
                          "or start over with resume=never") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _unreadable(path, lambda p: load_bytes(p.read_bytes()))


def restore(source: Path | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> Start:
    """Load a checkpoint into the freshly built model, optimizer and scheduler; where to start the loop."""
    if source is None:
        return Start()
    state = _read_state(source)
    weights = _load_tensors(source / "trainable.safetensors")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys() or any(weights[k].shape != params[k].shape for k in params):
        raise LmtuneError(f"resume: {source} does not fit this model's trainable parameters; "
                          "resume with the run's own config")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors = _load_tensors(source / "optimizer.safetensors")
    entries: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *state["optimizer"]["scalars"].items()]:
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": entries, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return Start(step=state["step"], summary=state["summary"], rng=state["rng"],
                 rng_tensors=_load_tensors(source / "rng.safetensors"))


# ---- guards --------------------------------------------------------------------------------------------

def check_finite(loss: float, grad_norm: float | None, step: int, out: Path) -> None:
    """Stop before a NaN / inf reaches the weights; the checkpoints written so far stay as they are."""
    bad = "loss" if not np.isfinite(loss) else "gradient norm" if grad_norm is not None and not np.isfinite(
        grad_norm) else None
    if bad is None:
        return
    raise LmtuneError(f"the {bad} became {loss if bad == 'loss' else grad_norm} at step {step}; stopped before "
                      f"updating the weights ({_last_good(out)}); lower train.lr, set train.max_grad_norm, "
                      "or check the data")


def _last_good(out: Path) -> str:
    found = checkpoints(out)
    return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"


def check_batches(batch_size: int, grad_accum: int, examples: int, micro_batches: int) -> str | None:
    """Refuse an optimizer step that needs more micro-batches than a pass over the data holds (it would see
    examples twice, and gathers all of them first); a note when the batch size exceeds the data, else None."""
    if grad_accum > micro_batches:
        raise LmtuneError(f"train.grad_accum={grad_accum} needs {grad_accum} micro-batches per optimizer step, but "
                          f"the {examples} training examples make only {micro_batches} of train.batch_size="
                          f"{batch_size}; set train.grad_accum<={micro_batches} or lower train.batch_size")
    if batch_size > examples:
        return (f"train.batch_size={batch_size} is more than the {examples} training examples: each batch holds "
                f"all {examples}")
    return None


def _sequences(item) -> tuple:
    """The sequences a training item holds: a pair holds two; a packed row several, each with its own positions."""
    if hasattr(item, "chosen"):
        return item.chosen, item.rejected
    return tuple(getattr(item, "examples", (item,)))


def check_lengths(examples: list, model: torch.nn.Module, generated: int = 0) -> None:
    """Refuse examples longer than the model can take, rather than fail deep in its forward; `generated`:
    tokens sampled after each one (grpo.max_new_tokens), which must fit too."""
    limit = position_limit(model)
    sequences = [seq for e in examples for seq in _sequences(e)]
    longest = max((len(e.input_ids) for e in sequences), default=0)
    if limit is not None and longest > limit:
        raise LmtuneError(f"an example has {longest} tokens, more than this model's limit of {limit} positions; "
                          f"set data.max_length={limit} (longer examples are then cut)")
    if limit is not None and generated and longest + generated > limit:
        raise LmtuneError(f"a prompt of {longest} tokens plus grpo.max_new_tokens={generated} passes this model's "
                          f"limit of {limit} positions; set grpo.max_new_tokens<={max(limit - longest, 1)} or "
                          f"data.max_length<={max(limit - generated, 1)}")
