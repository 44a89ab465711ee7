"""What a run reports besides its metrics.jsonl: TensorBoard scalars, peak memory, plots and `summary.md`."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lmtune.config import RunConfig
from lmtune.errors import LmtuneError
from lmtune.plots import plot_eval, plot_loss, plot_lr

TENSORBOARD_DIR = "tensorboard"


def _worst_case(summary: dict) -> str:
    worst = summary.get("predicted_worst_case_bytes")
    return "" if worst in (None, summary["predicted_peak_bytes"]) else f"; worst case at data.max_length {_gib(worst)}"


def check_tensorboard(cfg: RunConfig) -> None:
    """Before any work: `train.tensorboard` needs the optional package."""
    if not cfg.train.tensorboard:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise LmtuneError("train.tensorboard needs the tensorboard package: pip install 'lmtune[tensorboard]' "
                          "(or set train.tensorboard=false)") from None


class TensorBoard:
    """Every numeric field of a metrics row as a scalar at the row's step, under RUN_DIR/tensorboard;
    does nothing when not `enabled`."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The most memory the run held: tensors allocated on a CUDA device, else the process's peak resident set
    (which includes the Python interpreter and libraries, ~0.5 GiB)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "cuda allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024, "peak_memory_of": "process RSS"}


def write_plots(out: Path) -> list[str]:
    """loss.png, lr.png and (with eval data) eval.png from metrics.jsonl; returns the names written."""
    metrics = out / "metrics.jsonl"
    plot_loss(metrics, out / "loss.png")
    plot_lr(metrics, out / "lr.png")
    return ["loss.png", "lr.png"] + (["eval.png"] if plot_eval(metrics, out / "eval.png") else [])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary_markdown(cfg: RunConfig, summary: dict[str, Any], rows: list[dict], plots: list[str]) -> str:
    """One page: what was trained, on what, how long, and how the losses moved."""
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    data, method = summary.get("data", {}), cfg.method.model_dump(mode="json")
    options = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name") or "defaults"
    trainable, total = summary["trainable_params"], summary["total_params"]
    steps = max(summary["steps"], 1)
    lines = [
        f"# Run summary: {cfg.method.name} on {cfg.model.name or 'SmolLM2-135M-Instruct (default)'}", "",
        "| | |", "|---|---|",
        f"| model | {cfg.model.name or 'SmolLM2-135M-Instruct (default)'} ({cfg.model.dtype}, "
        f"quantization {cfg.model.quantization}) |",
        f"| method | {cfg.method.name} ({options}) |",
        f"| task | {cfg.task} |",
        f"| trainable parameters | {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%) |",
        f"| training data | {data.get('examples', 0):,} examples, {data.get('tokens', 0):,} tokens "
        f"({data.get('label_tokens', 0):,} learned), {data.get('truncated', 0)} truncated, "
        f"{data.get('skipped_bad', 0)} bad skipped |",
        f"| eval data | {summary.get('eval_examples', 0):,} examples |",
        f"| steps | {summary['steps']} x effective batch {summary['effective_batch']} "
        f"(lr {cfg.train.lr:g}, {cfg.train.schedule}, warm-up {cfg.train.warmup_steps}) |",
        f"| precision | {summary.get('precision', cfg.train.precision)}"
        f"{' (auto)' if cfg.train.precision == 'auto' else ''} |",
        f"| time | {summary.get('train_seconds', 0):.1f} s ({summary.get('train_seconds', 0) / steps:.2f} s / step, "
        "evals included) |",
    ]
    if "peak_memory_bytes" in summary:
        lines.append(f"| peak memory | {_gib(summary['peak_memory_bytes'])} ({summary['peak_memory_of']}) |")
    if "peak_error_pct" in summary:
        lines.append(f"| peak vs estimate | {_gib(summary['measured_peak_bytes'])} measured "
                     f"({summary['measured_peak_of']}), {_gib(summary['predicted_peak_bytes'])} predicted for "
                     f"{summary.get('predicted_peak_for', 'worst case at data.max_length')} "
                     f"({summary['peak_error_pct']:+.1f}%){_worst_case(summary)} |")
    if losses:
        lines.append(f"| train loss | {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step) |")
    if evals:
        lines.append(f"| eval loss | {evals[0]:.4f} (start) -> {evals[-1]:.4f} (end) |")
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += ["", "Files: `config.yaml` (resolved config), `metrics.jsonl` (every logged step), `summary.json`."]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, cfg: RunConfig, summary: dict[str, Any], plots: list[str]) -> None:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tmp = out / "summary.md.tmp"
    tmp.write_text(summary_markdown(cfg, summary, rows, plots))
    tmp.replace(out / "summary.md")
