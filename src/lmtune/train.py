"""One training loop for every method and objective: config -> model -> method -> data -> steps -> result."""

from __future__ import annotations

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
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lmtune.checkpoint import RUN_INFO, save
from lmtune.config import RunConfig, dump_config
from lmtune.data import TokenStats, collate, collate_pairs
from lmtune.data.pack import collate_packed, pack, packing_works
from lmtune.data.pipeline import load_data
from lmtune.errors import LmtuneError
from lmtune.models import load_model
from lmtune.objectives import OBJECTIVES, dpo_loss, label_weight, real_tokens, sequence_logps, simpo_loss
from lmtune.plots import plot_loss
from lmtune.tuned import TunedModel, apply

log = logging.getLogger("lmtune")


def _check_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / RUN_INFO).exists() and not cfg.overwrite:
        raise LmtuneError(f"{out} already holds a finished run; choose another output_dir or set overwrite=true")
    return out


def _prepare_output(cfg: RunConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_INFO).unlink(missing_ok=True)  # an overwrite that dies must not pass for the old finished run
    (out / "metrics.jsonl").write_text("")
    (out / "config.yaml").write_text(dump_config(cfg))


PREFERENCE_TASKS = ("dpo", "simpo")


def _load_data(cfg: RunConfig, tokenizer) -> tuple[list, list, TokenStats]:
    if cfg.data.packing and cfg.task in PREFERENCE_TASKS:
        raise LmtuneError(f"data.packing applies to sft and pretrain, not to task {cfg.task}; set data.packing=false")
    train, evals, stats = load_data(cfg.data, tokenizer, cfg.task, cfg.train.seed)
    if cfg.data.packing:
        train, evals = pack(train, cfg.data.max_length), pack(evals, cfg.data.max_length)
    return train, evals, stats


def _collate_fn(cfg: RunConfig, pad_id: int):
    """Batches of pairs (preference tasks), of packed rows, or of padded examples."""
    if cfg.task in PREFERENCE_TASKS:
        return functools.partial(collate_pairs, pad_id=pad_id)
    return functools.partial(collate_packed if cfg.data.packing else collate, pad_id=pad_id)


def _objective(cfg: RunConfig):
    p = cfg.preference
    if cfg.task == "dpo":
        return functools.partial(dpo_loss, beta=p.beta_for("dpo"), label_smoothing=p.label_smoothing)
    if cfg.task == "simpo":
        return functools.partial(simpo_loss, beta=p.beta_for("simpo"), gamma=p.gamma,
                                 label_smoothing=p.label_smoothing)
    return OBJECTIVES[cfg.task]


def _check_packing(cfg: RunConfig, tuned: TunedModel) -> None:
    if cfg.data.packing and not packing_works(tuned):
        raise LmtuneError(f"data.packing: this model ({type(tuned.model).__name__}) attends across packed examples "
                          "(it does not read restarting position ids as separate sequences); set data.packing=false")


def can_switch_off(tuned: TunedModel) -> bool:
    return any(hasattr(m, "disabled") for m in tuned.model.modules())


@torch.no_grad()
def attach_reference_logps(model: torch.nn.Module, pairs: list, collate_fn, batch_size: int, device) -> None:
    """DPO with a method that changes the base weights: the reference log-probs of every pair, computed once
    by the untrained model, travel with the pairs (no second model in memory)."""
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_fn(chunk).items()}
        chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
            pair.ref_logps = (c, r)
    model.train()


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, objective) -> dict[str, float]:
    """Mean loss and metrics per unit of weight (label token, or pair) over the whole loader."""
    model.eval()
    total, weight, sums = 0.0, 0, {}
    for batch in loader:
        loss_sum, count, metrics = objective(model, batch)
        total, weight = total + float(loss_sum), weight + int(count)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    model.train()
    return {"loss": total / max(weight, 1), **{name: v / max(weight, 1) for name, v in sums.items()}}


def evaluate_loss(model: torch.nn.Module, loader: DataLoader, objective) -> float:
    """Mean loss per unit of weight (per label token for SFT) over the whole loader."""
    return evaluate(model, loader, objective)["loss"]


def _eval_row(cfg: RunConfig, model: torch.nn.Module, loader: DataLoader, objective) -> dict[str, float]:
    """`eval_loss` and the task's eval metrics (perplexity for pretrain, rewards and accuracies for preferences)."""
    result = evaluate(model, loader, objective)
    row = {f"eval_{name}": value for name, value in result.items()}
    if cfg.task in ("pretrain", "sft"):
        row["eval_perplexity"] = math.exp(min(result["loss"], 50.0))
    return row


def run(cfg: RunConfig) -> dict:
    """Train as `cfg` says; returns a summary (also written to the run directory)."""
    out = _check_output(cfg)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code)
    # Data before anything is logged or written: a bad record fails as one line and leaves no directory.
    train_set, eval_set, stats = _load_data(cfg, tokenizer)
    # Seeded after loading: a first-use conversion of the default model draws random numbers.
    set_seed(cfg.train.seed)
    tuned = apply(model, cfg.method, base_name=cfg.model.name)
    _check_packing(cfg, tuned)
    _prepare_output(cfg, out)
    log.info(tuned.describe_parameters())
    log.info("data: %d train / %d eval %s, %d truncated (%d tokens cut), %d dropped with no labels%s",
             len(train_set), len(eval_set), "packed rows" if cfg.data.packing else "examples", stats.truncated,
             stats.tokens_cut, stats.dropped_no_labels,
             f", {stats.skipped_bad} bad records skipped" if stats.skipped_bad else "")
    t = cfg.train
    accelerator = Accelerator(cpu=t.device == "cpu")
    pad = _collate_fn(cfg, tokenizer.pad_token_id)
    loader = DataLoader(train_set, batch_size=t.batch_size, shuffle=True, collate_fn=pad,
                        generator=torch.Generator().manual_seed(t.seed))
    eval_loader = DataLoader(eval_set, batch_size=t.batch_size, collate_fn=pad) if eval_set else None
    steps = t.steps or max(1, math.ceil(t.epochs * len(loader) / t.grad_accum))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, t.warmup_steps, steps, t.schedule))
    tuned, optimizer, loader = accelerator.prepare(tuned, optimizer, loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if cfg.task == "dpo" and not can_switch_off(accelerator.unwrap_model(tuned)):
        attach_reference_logps(tuned, train_set + eval_set, pad, t.batch_size, accelerator.device)
    summary = _loop(cfg, tuned, optimizer, scheduler, loader, eval_loader, steps, accelerator, out)
    summary["data"] = asdict(stats)
    unwrapped: TunedModel = accelerator.unwrap_model(tuned)
    summary["trainable_params"], summary["total_params"] = unwrapped.trainable_parameters()
    if accelerator.is_main_process:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        save(unwrapped, out, tokenizer)
    return summary


def _backward(model, objective, micro: list[dict], weight: int, accelerator) -> tuple[float, int, dict]:
    """Gradients of one optimizer step's micro-batches; (loss, real tokens, metrics), each per unit of weight."""
    step_loss, tokens, step_metrics = 0.0, 0, {}
    for batch in micro:
        loss_sum, _, metrics = objective(model, batch)
        accelerator.backward(loss_sum / weight)
        step_loss += float(loss_sum.detach()) / weight
        tokens += real_tokens(batch)
        for name, value in metrics.items():
            step_metrics[name] = step_metrics.get(name, 0.0) + value / weight
    return step_loss, tokens, step_metrics


def _loop(cfg, model, optimizer, scheduler, loader, eval_loader, steps, accelerator, out: Path) -> dict:
    """The loop: forward, objective, backward over `grad_accum` micro-batches, clip, step, log, eval."""
    t, objective = cfg.train, _objective(cfg)
    metrics = (out / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    summary: dict = {"steps": steps}

    def record(row: dict) -> None:
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    if eval_loader is not None:
        start = _eval_row(cfg, model, eval_loader, objective)
        summary["eval_loss_start"], summary["eval_start"] = start["eval_loss"], start
        record({"step": 0, **start})
    batches, model_start = _batches(loader), time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    for step in bar:
        micro = [next(batches) for _ in range(t.grad_accum)]
        # Normalise by the step's label tokens, not per micro-batch: every token weighs the same.
        weight = max(sum(label_weight(b) for b in micro), 1)
        started = time.perf_counter()
        step_loss, tokens, step_metrics = _backward(model, objective, micro, weight, accelerator)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]  # the rate this step uses; after scheduler.step() it is the next one's
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "loss": step_loss, "lr": lr,
               "tokens_per_s": tokens / (time.perf_counter() - started)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        row.update(step_metrics)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % t.log_every == 0 or step == steps:
            record(row)
        if eval_loader is not None and (step == steps or (t.eval_every and step % t.eval_every == 0)):
            evaluated = _eval_row(cfg, model, eval_loader, objective)
            summary.update(evaluated)
            record({"step": step, **evaluated})
            bar.write(f"step {step}: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in evaluated.items()))
        summary["loss"] = step_loss
    summary["train_seconds"] = time.perf_counter() - model_start
    if metrics:
        metrics.close()
    return summary
