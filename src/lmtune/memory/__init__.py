"""Memory planning: the peak memory of a training run, predicted from the model's config alone.

`core.py` builds the estimate (`MemoryPlan` -> `estimate` -> `Estimate`), `trace.py` traces one training step on
fake tensors, `formulas.py` holds the cited byte counts for what the trace cannot run, `report.py` formats the
estimate and runs the pre-flight check of `lmtune train`, `cli.py` is `lmtune estimate`.
The names below load on first use, so that `lmtune --help` does not import torch.
"""

from __future__ import annotations

_PUBLIC = ("MemoryPlan", "Estimate", "estimate", "load_model_config")


def __getattr__(name: str):
    if name in _PUBLIC:
        from lmtune.memory import core

        return getattr(core, name)
    raise AttributeError(f"module 'lmtune.memory' has no attribute {name!r}")


__all__ = list(_PUBLIC)
