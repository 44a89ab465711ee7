"""Plots of a run's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_loss(metrics_path: Path, out: Path) -> None:
    """Training loss per step and eval loss where measured, in one PNG."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


def _rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


def plot_lr(metrics_path: Path, out: Path) -> None:
    """The learning rate each optimizer step used."""
    points = [(r["step"], r["lr"]) for r in _rows(metrics_path) if "lr" in r]
    fig, ax = plt.subplots(figsize=(7, 3), dpi=110)
    if points:
        ax.plot(*zip(*points, strict=True), linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    _save(fig, out)


def plot_eval(metrics_path: Path, out: Path) -> bool:
    """Every eval metric against the step, one panel each; False (and no file) when the run had no eval."""
    rows = [r for r in _rows(metrics_path) if "eval_loss" in r]
    names = [k for k in rows[0] if k.startswith("eval_")] if rows else []
    if not names:
        return False
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), dpi=110, sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        ax.plot([r["step"] for r in rows], [r.get(name) for r in rows], "o-")
        ax.set_ylabel(name.removeprefix("eval_"))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    _save(fig, out)
    return True


def plot_curves(curves: dict[str, list[tuple[int, float]]], out: Path, ylabel: str = "eval loss (nats / token)",
                log: bool = False) -> None:
    """One line per name (e.g. each method's eval loss against the step) in one PNG."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=name, markersize=3)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    _save(fig, out)


def plot_bars(names: list[str], panels: dict[str, list[float | None]], out: Path, log: tuple[str, ...] = ()) -> None:
    """Side-by-side bar panels sharing the names on the x axis (missing values leave a gap)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), dpi=110, squeeze=False)
    for ax, (title, values) in zip(axes[0], panels.items(), strict=True):
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [values[i] for i in xs], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if title in log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    _save(fig, out)
