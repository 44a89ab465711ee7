"""Preference alignment from `{"prompt", "chosen", "rejected"}` pairs: DPO and SimPO.

DPO (Rafailov et al. 2023) compares the policy's margin with the reference's: the base model with the method
switched off, or for methods that change the base weights, log-probs cached before training
(`tasks.reference`). SimPO (Meng et al. 2024) is reference-free. Options: the `preference` section.
"""

from __future__ import annotations

import functools

from lmtune.objectives import dpo_loss, simpo_loss
from lmtune.tasks import Task, register


def _beta(cfg, default: float) -> float:
    return cfg.preference.beta if cfg.preference.beta is not None else default


def _dpo(cfg):
    return functools.partial(dpo_loss, beta=_beta(cfg, 0.1), label_smoothing=cfg.preference.label_smoothing)


def _simpo(cfg):
    p = cfg.preference
    return functools.partial(simpo_loss, beta=_beta(cfg, 2.0), gamma=p.gamma, label_smoothing=p.label_smoothing)


register(Task(
    name="dpo", summary="preferences against the base model as reference (sigmoid DPO); eval reports loss, "
    "rewards and accuracies",
    objective=_dpo, section="preference", records="pairs", reference="sequences", memory_task="dpo"))
register(Task(
    name="simpo", summary="reference-free preferences (length-normalised margin); eval as dpo",
    objective=_simpo, section="preference", records="pairs"))
