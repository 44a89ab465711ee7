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
from lmtune.data import Example, TokenStats, collate, split, tokenize_records
from lmtune.errors import LmtuneError
from lmtune.memory.report import preflight
from lmtune.models import load_model
from lmtune.objectives import OBJECTIVES, label_weight
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


def _load_data(cfg: RunConfig, tokenizer) -> tuple[list[Example], list[Example], TokenStats]:
    d = cfg.data
    train, stats = tokenize_records(d.train, tokenizer, d.max_length, d.prompt_format)
    if d.eval is not None:
        evals, _ = tokenize_records(d.eval, tokenizer, d.max_length, d.prompt_format)
    else:
        train, evals = split(train, d.eval_split, cfg.train.seed)
    return train, evals, stats


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
def evaluate_loss(model: torch.nn.Module, loader: DataLoader, objective) -> float:
    """Mean loss per unit of weight (per label token for SFT) over the whole loader."""
    model.eval()
    total, weight = 0.0, 0
    for batch in loader:
        loss_sum, count, _ = objective(model, batch)
        total, weight = total + float(loss_sum), weight + int(count)
    model.train()
    return total / max(weight, 1)


def run(cfg: RunConfig) -> dict:
    """Train as `cfg` says; returns a summary (also written to the run directory)."""
    out = _check_output(cfg)
    memory_report = preflight(cfg)  # before any weight is loaded: a run that cannot fit is refused in seconds
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype, cfg.model.trust_remote_code)
    # Data before anything is logged or written: a bad record fails as one line and leaves no directory.
    train_set, eval_set, stats = _load_data(cfg, tokenizer)
    # Seeded after loading: a first-use conversion of the default model draws random numbers.
    set_seed(cfg.train.seed)
    tuned = apply(model, cfg.method, base_name=cfg.model.name)
    _prepare_output(cfg, out)
    log.info(tuned.describe_parameters())
    log.info("%s", memory_report)
    log.info("data: %d train / %d eval examples, %d truncated (%d tokens cut), %d dropped with no labels",
             len(train_set), len(eval_set), stats.truncated, stats.tokens_cut, stats.dropped_no_labels)
    t = cfg.train
    accelerator = Accelerator(cpu=t.device == "cpu")
    pad = functools.partial(collate, pad_id=tokenizer.pad_token_id)
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
    summary = _loop(cfg, tuned, optimizer, scheduler, loader, eval_loader, steps, accelerator, out)
    summary["data"] = asdict(stats)
    unwrapped: TunedModel = accelerator.unwrap_model(tuned)
    summary["trainable_params"], summary["total_params"] = unwrapped.trainable_parameters()
    if accelerator.is_main_process:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        save(unwrapped, out, tokenizer)
    return summary


def _loop(cfg, model, optimizer, scheduler, loader, eval_loader, steps, accelerator, out: Path) -> dict:
    """The loop: forward, objective, backward over `grad_accum` micro-batches, clip, step, log, eval."""
    t, objective = cfg.train, OBJECTIVES[cfg.task]
    metrics = (out / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    summary: dict = {"steps": steps}

    def record(row: dict) -> None:
        if metrics:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    if eval_loader is not None:
        summary["eval_loss_start"] = evaluate_loss(model, eval_loader, objective)
        record({"step": 0, "eval_loss": summary["eval_loss_start"]})
    batches, model_start = _batches(loader), time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="train", disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    for step in bar:
        micro = [next(batches) for _ in range(t.grad_accum)]
        # Normalise by the step's label tokens, not per micro-batch: every token weighs the same.
        weight = max(sum(label_weight(b) for b in micro), 1)
        step_loss, tokens, started = 0.0, 0, time.perf_counter()
        for batch in micro:
            loss_sum, _, _ = objective(model, batch)
            accelerator.backward(loss_sum / weight)
            step_loss += float(loss_sum.detach()) / weight
            tokens += int(batch["attention_mask"].sum())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        lr = scheduler.get_last_lr()[0]  # the rate this step uses; after scheduler.step() it is the next one's
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "loss": step_loss, "lr": lr,
               "tokens_per_s": tokens / (time.perf_counter() - started)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % t.log_every == 0 or step == steps:
            record(row)
        if eval_loader is not None and (step == steps or (t.eval_every and step % t.eval_every == 0)):
            summary["eval_loss"] = evaluate_loss(model, eval_loader, objective)
            record({"step": step, "eval_loss": summary["eval_loss"]})
            bar.write(f"step {step}: eval loss {summary['eval_loss']:.4f}")
        summary["loss"] = step_loss
    summary["train_seconds"] = time.perf_counter() - model_start
    if metrics:
        metrics.close()
    return summary
