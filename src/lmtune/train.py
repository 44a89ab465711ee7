"""One training loop for every method and task: config -> model -> method -> data -> steps -> result.

It gets a method (`methods.get_method`) and a task (`tasks.get_task`) and names neither."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmtune import distributed
from lmtune.checkpoint import RUN_INFO, save
from lmtune.config import RunConfig, TrainConfig, dump_config
from lmtune.data import TokenStats, collate, collate_pairs, preserve
from lmtune.data.pack import collate_packed, pack, packing_works
from lmtune.data.pipeline import load_data
from lmtune.errors import LmtuneError
from lmtune.memory.report import preflight
from lmtune.methods import get_method
from lmtune.models import load_model
from lmtune.monitor import (
    TensorBoard,
    check_tensorboard,
    peak_memory,
    reset_peak_memory,
    write_plots,
    write_summary,
)
from lmtune.objectives import label_weight, real_tokens, sequence_logps
from lmtune.precision import resolve as resolve_precision
from lmtune.quantize import check_method
from lmtune.resume import (
    Start,
    check_batches,
    check_finite,
    check_lengths,
    prepare,
    restore,
    resume_point,
    save_if_due,
)
from lmtune.runlock import RunLock, check_new_path, run_lock
from lmtune.stop import StopFlag, Stopped, stop_on_signal
from lmtune.tasks import Task, evaluate, get_task, reference
from lmtune.tuned import TunedModel, apply, enable_gradient_checkpointing

log = logging.getLogger("lmtune")


def _check_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    check_new_path(out, "output_dir")
    if (out / RUN_INFO).exists() and not cfg.overwrite:
        raise LmtuneError(f"{out} already holds a finished run; choose another output_dir or set overwrite=true")
    return out


def _prepare_output(cfg: RunConfig, out: Path, lock: RunLock) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()  # before the first write: a second run must not touch a live run's files
    (out / RUN_INFO).unlink(missing_ok=True)  # an overwrite that dies must not pass for the old finished run
    (out / "metrics.jsonl").write_text("")
    (out / "config.yaml").write_text(dump_config(cfg))


def _load_data(cfg: RunConfig, task: Task, tokenizer) -> tuple[list, list, TokenStats]:
    if cfg.data.packing and not task.packing:
        raise LmtuneError(f"data.packing applies to sft and pretrain, not to task {task.name}; set data.packing=false")
    if task.load is not None:
        return task.load(cfg, tokenizer)
    train, evals, stats = load_data(cfg.data, tokenizer, task.records, cfg.train.seed)
    if cfg.data.packing:
        train, evals = pack(train, cfg.data.max_length), pack(evals, cfg.data.max_length)
    return train, evals, stats


def _collate_fn(cfg: RunConfig, task: Task, pad_id: int):
    """The task's own batches, else pairs, packed rows, or padded examples."""
    if task.collate is not None:
        return task.collate(cfg, pad_id)
    if task.records == "pairs":
        return functools.partial(collate_pairs, pad_id=pad_id)
    return functools.partial(collate_packed if cfg.data.packing else collate, pad_id=pad_id)


def _check_packing(cfg: RunConfig, tuned: TunedModel) -> None:
    if cfg.data.packing and not packing_works(tuned):
        raise LmtuneError(f"data.packing: this model ({type(tuned.model).__name__}) attends across packed examples "
                          "(it does not read restarting position ids as separate sequences); set data.packing=false")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The multiple of the peak rate that optimizer step `step` (from 0) uses: linear warm-up from 0, then decay.

    The same curves as transformers' schedules, written out because `transformers.get_scheduler` imports
    its Trainer utilities and, where peft is installed, peft: seconds on every `lmtune train`.
    """
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def _batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches; each pass over the data is reshuffled."""
    while True:
        yield from loader


def evaluate_loss(model: torch.nn.Module, loader: DataLoader, objective, device: torch.device | str = "cpu") -> float:
    """Mean loss per unit of weight (per label token for SFT) over the whole loader."""
    return evaluate(model, loader, objective, device)["loss"]


def _weights_dtype(cfg: RunConfig, precision: str) -> str:
    """The dtype the base weights load in: mixed precision keeps fp32 master weights, `bf16` does not."""
    dtype = cfg.model.dtype
    if precision == "bf16":
        if dtype not in ("float32", "bfloat16"):
            raise LmtuneError(f"train.precision=bf16 loads the weights in bfloat16; drop model.dtype={dtype}")
        return "bfloat16"
    if precision != "fp32" and dtype != "float32":
        raise LmtuneError(f"train.precision={precision} keeps fp32 master weights, but model.dtype={dtype}; set "
                          f"model.dtype=float32, or train.precision=bf16 for weights in bf16")
    return dtype


def _accelerator(t: TrainConfig, precision: str) -> Accelerator:
    """Devices, mixed precision and (under torchrun / accelerate launch) the process group, from accelerate."""
    mixed = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(precision, "no")
    if mixed == "fp16" and (t.device == "cpu" or not torch.cuda.is_available()):
        # accelerate would silently run fp32 here: the CPU's autocast has no fp16.
        raise LmtuneError("train.precision=fp16-mixed needs a CUDA GPU; on the CPU use bf16-mixed")
    # accelerate keeps one state per process; reset it so that runs in one process may differ in precision
    # (the process group, in PartialState, is kept).
    AcceleratorState._reset_state()
    return distributed.make_accelerator(t.device == "cpu", mixed)  # FSDP when the launch asks for it


def run(cfg: RunConfig) -> dict:
    """Train as `cfg` says; returns a summary (also written to the run directory)."""
    with run_lock(Path(cfg.output_dir)) as lock:
        return _run(cfg, lock)


def _tuned_model(cfg: RunConfig, task: Task, model, tokenizer, guarded: bool) -> TunedModel:
    """The method applied, with what the task and the forgetting guard need from the model."""
    tuned = apply(model, cfg.method, base_name=cfg.model.name, tokenizer=tokenizer)
    if task.prepare_model is not None:
        task.prepare_model(tuned)  # e.g. the reward head: trains with whatever the method trains, saved beside it
    if guarded and cfg.data.preserve.kl:
        reference.hold_copy_if_needed(tuned)  # the KL's base: the method switched off, else a frozen copy
    _check_packing(cfg, tuned)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(tuned)
    return tuned


def _run(cfg: RunConfig, lock: RunLock) -> dict:
    out = _check_output(cfg)
    memory_report = preflight(cfg)  # before any weight is loaded: a run that cannot fit is refused in seconds
    check_tensorboard(cfg)
    source = resume_point(cfg, out)
    m, t = cfg.model, cfg.train
    check_method(cfg.method.name, get_method(cfg.method.name).saves_whole_model, m.quantization)
    precision, why = resolve_precision(cfg)
    accelerator = _accelerator(t, precision)
    reset_peak_memory(accelerator.device)
    task = get_task(cfg.task)
    if task.one_process and accelerator.num_processes > 1:
        # The reward head is read outside the distributed wrapper's forward, and rollouts are not sharded.
        raise LmtuneError(f"task {task.name} runs on one process for now; launch it without torchrun / accelerate")
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of the progress log, from rank 0
    model, tokenizer = load_model(m.name, _weights_dtype(cfg, precision), m.trust_remote_code, quantization=m.quantization,
                                  quant_type=m.quant_type, double_quant=m.double_quant)
    # Data before anything is logged or written: a bad record fails as one line and leaves no directory.
    train_set, eval_set, stats = _load_data(cfg, task, tokenizer)
    train_set, guard = preserve.mix(cfg, model, tokenizer, train_set)  # data.preserve: the base model's answers
    check_lengths(train_set + eval_set, model, cfg.grpo.max_new_tokens if task.memory_shape == "grpo" else 0)
    batch_note = check_batches(t.batch_size, t.grad_accum, len(train_set), math.ceil(len(train_set) / t.batch_size))
    # Seeded after loading: a first-use conversion of the default model draws random numbers.
    set_seed(cfg.train.seed)
    tuned = _tuned_model(cfg, task, model, tokenizer, guard is not None)
    if accelerator.is_main_process:
        _prepare_output(cfg, out, lock)
        prepare(out, source)
    accelerator.wait_for_everyone()
    log.info(tuned.describe_parameters())
    log.info("precision: %s (%s%s)", precision, "auto: " if t.precision == "auto" else "", why)
    memory_report.fit_to_data(train_set, eval_set)  # the end-of-run check compares with this data's lengths
    log.info("%s", memory_report)
    log.info("data: %d train / %d eval %s, %d truncated (%d tokens cut), %d dropped with no labels%s",
             len(train_set), len(eval_set), "packed rows" if cfg.data.packing else "examples", stats.truncated,
             stats.tokens_cut, stats.dropped_no_labels,
             f", {stats.skipped_bad} bad records skipped" if stats.skipped_bad else "")
    world = accelerator.num_processes
    effective = t.batch_size * t.grad_accum * world  # examples per optimizer step
    log.info("batch: %d examples x %d accumulation x %d processes = %d per optimizer step", t.batch_size,
             t.grad_accum, world, effective)
    if batch_note:
        log.info("batch: %s", batch_note)
    pad = _collate_fn(cfg, task, tokenizer.pad_token_id)
    loader = DataLoader(train_set, batch_size=t.batch_size, shuffle=True, collate_fn=pad,
                        generator=torch.Generator().manual_seed(t.seed))
    eval_loader = DataLoader(eval_set, batch_size=t.batch_size, collate_fn=pad) if eval_set else None
    if task.loaders is not None:  # e.g. grpo: micro-batches are sampled completions; before any restore
        loader, eval_loader = task.loaders(cfg, tuned.to(accelerator.device), tokenizer, loader, eval_set)
    steps = t.steps or max(1, math.ceil(t.epochs * len(loader) / (t.grad_accum * world)))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, t.warmup_steps, steps, t.schedule))
    visits = steps * effective
    if task.reference == "sequences" and reference.cache_pays(tuned, visits, len(train_set) + len(eval_set)):
        # Before a checkpoint is restored: the reference is the model as it was before any training.
        reference.cache_pair_logps(tuned.to(accelerator.device), train_set + eval_set, pad, t.batch_size,
                                   accelerator.device, sequence_logps)
    start = restore(source, tuned, optimizer, scheduler)
    # The eval loader stays unsharded: every process scores the whole set, so the figure is exact.
    tuned, optimizer, loader = distributed.prepare(accelerator, tuned, optimizer, loader)
    with stop_on_signal() as stop:  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, leave
        summary = _loop(cfg, task, tuned, optimizer, scheduler, loader, eval_loader, steps, accelerator, out,
                        start, stop)
    summary["data"] = asdict(stats)
    summary["effective_batch"] = effective
    summary["eval_examples"] = len(eval_set)
    summary["precision"] = precision
    summary.update(peak_memory(accelerator.device))
    summary.update(memory_report.check(accelerator.device))  # the measured peak next to the prediction
    accelerator.wait_for_everyone()
    with distributed.gathered(accelerator, tuned) as (whole, _):  # under FSDP: gathered from the shards
        if accelerator.is_main_process:
            summary["trainable_params"], summary["total_params"] = whole.trainable_parameters()
            summary.update(preserve.report(guard, whole, tokenizer.pad_token_id))  # data.preserve: retention
            plots = write_plots(out)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            write_summary(out, cfg, summary, plots)
            save(whole, out, tokenizer)
    return summary


def _loop(cfg, task: Task, model, optimizer, scheduler, loader, eval_loader, steps, accelerator, out: Path,
          start: Start, stop: StopFlag | None = None) -> dict:
    """The loop: forward, objective, backward over `grad_accum` micro-batches, clip, step, log, eval, checkpoint."""
    t, objective = cfg.train, task.objective(cfg)
    metrics = (out / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    board = TensorBoard(out, t.tensorboard and accelerator.is_main_process)
    summary: dict = {**start.summary, "steps": steps}
    unwrapped = accelerator.unwrap_model(model)

    def evaluate() -> dict[str, float]:
        with accelerator.autocast():  # the unwrapped model is not autocast by accelerate
            return task.eval_row(unwrapped, eval_loader, objective, accelerator.device)

    def record(row: dict) -> None:
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        board.log(row)

    if eval_loader is not None and start.step == 0:
        first = evaluate()
        summary["eval_loss_start"], summary["eval_start"] = first.get("eval_loss"), first
        record({"step": 0, **first})
    batches, model_start = _batches(loader), time.perf_counter()
    start.replay(batches, t.grad_accum)  # a resumed run: the seeded data order up to its step, then its RNG
    bar = tqdm(range(start.step + 1, steps + 1), desc="train", disable=not accelerator.is_main_process,
               dynamic_ncols=True, initial=start.step, total=steps)
    model.train()
    for step in bar:
        row = {"step": step, **train_step(model, optimizer, scheduler, [next(batches) for _ in range(t.grad_accum)],
                                          objective, accelerator, t.max_grad_norm,
                                          check=functools.partial(check_finite, step=step, out=out))}
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % t.log_every == 0 or step == steps:
            record(row)
        if eval_loader is not None and (step == steps or (t.eval_every and step % t.eval_every == 0)):
            evaluated = evaluate()
            summary.update(evaluated)
            record({"step": step, **evaluated})
            bar.write(f"step {step}: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in evaluated.items()))
        summary["loss"] = row["loss"]
        _save_or_stop(out, step, steps, cfg, accelerator, model, optimizer, scheduler, summary, stop)
    summary["train_seconds"] = time.perf_counter() - model_start
    if metrics:
        metrics.close()
    board.close()
    return summary


def _save_or_stop(out: Path, step: int, steps: int, cfg, accelerator, model, optimizer, scheduler, summary: dict,
                  stop: StopFlag | None) -> None:
    """Checkpoint when due; on a stop request, checkpoint this step and leave (raises `Stopped`)."""
    # Every process stops after the same step (a signal may reach only some of them).
    stopping = stop is not None and _global_sum(accelerator, float(stop.requested)) > 0
    save_if_due(out, step, steps, cfg, accelerator, model, optimizer, scheduler, summary, force=stopping)
    if stopping:
        raise Stopped(f"stopped after step {step} of {steps}; its checkpoint is in {out / 'checkpoints'}; "
                      "run the same config again to resume")


def train_step(model, optimizer, scheduler, micro: list[dict], objective, accelerator: Accelerator,
               max_grad_norm: float | None, check=None) -> dict:
    """One optimizer step as `lmtune train` takes it (forward + backward over the micro-batches, clip, update);
    the row it logs. `check(loss, grad_norm)` runs before the update (the loop stops on NaN there)."""
    started = time.perf_counter()
    step_loss, tokens, step_metrics = _accumulate(model, micro, objective, accelerator)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
    if check is not None:
        check(step_loss, None if grad_norm is None else float(grad_norm))
    lr = scheduler.get_last_lr()[0]  # the rate this step uses; after scheduler.step() it is the next one's
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    row = {"loss": step_loss, "lr": lr, "tokens_per_s": tokens / seconds, "step_seconds": seconds}
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    return {**row, **step_metrics}


def _accumulate(model, micro: list[dict], objective, accelerator: Accelerator) -> tuple[float, float, dict]:
    """Backward over one optimizer step's micro-batches; (step loss, real tokens, metrics), summed over processes.

    The loss is normalised by the step's weight (label tokens, or pairs) over every process, not per
    micro-batch or per process: every token weighs the same, and N processes equal one process with the
    same global batch. Metrics are per unit of weight, like the loss.
    """
    world = accelerator.num_processes
    weight = max(_global_sum(accelerator, sum(label_weight(b) for b in micro)), 1)
    step_loss, tokens, step_metrics = 0.0, 0, {}
    for i, batch in enumerate(micro):
        # Gradients are all-reduced once per optimizer step, after the last micro-batch.
        with accelerator.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext():
            loss_sum, _, metrics = objective(model, batch)
            # DDP averages gradients over processes; scaling by the world size turns that into a sum.
            accelerator.backward(loss_sum * world / weight)
        step_loss += float(loss_sum.detach()) / weight
        tokens += real_tokens(batch)
        for name, value in metrics.items():
            step_metrics[name] = step_metrics.get(name, 0.0) + value / weight
    metrics = {name: _global_sum(accelerator, v) for name, v in step_metrics.items()}
    return _global_sum(accelerator, step_loss), _global_sum(accelerator, tokens), metrics


def _global_sum(accelerator: Accelerator, value: float) -> float:
    """`value` summed over every process (itself when there is one)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(float(value), device=accelerator.device), "sum").item()
