"""The task registry: every training objective registers one `Task`, as every method registers one `Method`.

A task says how its records become batches, its loss `(model, batch) -> (summed loss, weight, metrics)`, its
evaluation row, and what it needs from the model (a reference, a head, one process). `train.py` gets a task
from `get_task(cfg.task)` and a method from `get_method(...)`, and names neither. Each task module under this
package calls `register` at its bottom; adding a task is adding a file here.

This module imports nothing of lmtune's but `errors`: `config.py` reads the task names from it, and the task
modules (loaded on first use, like the methods) import `config.py`.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmtune.errors import LmtuneError

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, dict[str, float]]]
"""(model, batch) -> (summed loss, weight, metrics): the loop divides a step's summed loss and metrics by the
step's total weight (label tokens, pairs, completions), so accumulation is normalised by that weight."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, objective: Objective,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean loss and metrics per unit of weight (label token, or pair) over the whole loader."""
    model.eval()
    total, weight, sums = 0.0, 0, {}
    for batch in loader:
        loss_sum, count, metrics = objective(model, {k: v.to(device) for k, v in batch.items()})
        total, weight = total + float(loss_sum), weight + int(count)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
    model.train()
    return {"loss": total / max(weight, 1), **{name: v / max(weight, 1) for name, v in sums.items()}}


def mean_eval_row(model: torch.nn.Module, loader: Any, objective: Objective,
                  device: torch.device | str) -> dict[str, float]:
    """The default evaluation: `eval_loss` and every metric of the objective, averaged over the eval set."""
    return {f"eval_{name}": value for name, value in evaluate(model, loader, objective, device).items()}


def perplexity_eval_row(model: torch.nn.Module, loader: Any, objective: Objective,
                        device: torch.device | str) -> dict[str, float]:
    """The default evaluation plus `eval_perplexity` = exp(mean NLL per token)."""
    row = mean_eval_row(model, loader, objective, device)
    return {**row, "eval_perplexity": math.exp(min(row["eval_loss"], 50.0))}


@dataclass(frozen=True)
class Task:
    """What the training loop knows about a task."""

    name: str
    summary: str
    """One line: what it trains on and what its evaluation reports (`lmtune train --help`)."""
    objective: Callable[[Any], Objective]
    """RunConfig -> the loss, with the task's options bound (from the config section it reads)."""
    section: str | None = None
    """The RunConfig section holding its options (`preference`, `grpo`), if any."""
    records: Literal["sft", "pretrain", "pairs"] = "sft"
    """How the data layer reads its records: examples with masked labels, pretraining blocks, or preference pairs."""
    load: Callable[[Any, Any], tuple[list, list, Any]] | None = None
    """(cfg, tokenizer) -> (train items, eval items, TokenStats); None: the data pipeline, by `records`."""
    collate: Callable[[Any, int], Callable[[list], Any]] | None = None
    """(cfg, pad id) -> the DataLoader's collate_fn; None: padded examples (packed rows with data.packing)."""
    packing: bool = False
    """Whether data.packing applies (examples are independent rows of one kind)."""
    eval_row: Callable[[torch.nn.Module, Any, Objective, Any], dict[str, float]] = mean_eval_row
    """(model, eval loader, objective, device) -> the `eval_*` row logged at each evaluation."""
    reference: Literal["none", "sequences", "samples"] = "none"
    """What the loss compares against the untrained model: nothing; log-probs of the fixed data (`sequences`:
    computed once before training when the method cannot be switched off); or of fresh samples (`samples`: the
    model with its method switched off, else a frozen copy). `tasks.reference` decides which."""
    prepare_model: Callable[[Any], None] | None = None
    """Change the tuned model before training (the reward head); called right after the method is applied."""
    loaders: Callable[..., tuple[Any, Any]] | None = None
    """(cfg, tuned, tokenizer, train loader, eval set) -> (train micro-batches, eval loader): GRPO's rollouts."""
    preview: Callable[[Any, Any, int], str] | None = None
    """(cfg, tokenizer, count) -> `lmtune data preview`'s text; None: records tokenised, trained-on tokens marked."""
    one_process: bool = False
    """Refuse torchrun / accelerate launch with several processes."""
    memory_task: str | None = None
    """The step the memory estimator traces, a name in `memory.tasks.SHAPES` (rows, lengths, reference pass,
    sampling); None: the task's own name."""

    @property
    def memory_shape(self) -> str:
        return self.memory_task or self.name


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "reference":
            importlib.import_module(f"{__name__}.{info.name}")


def get_task(name: str) -> Task:
    _load_all()
    if name not in _REGISTRY:
        raise LmtuneError(f"unknown task '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
