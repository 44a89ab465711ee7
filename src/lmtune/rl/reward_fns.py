"""GRPO rewards: Python functions named `module:function` in the YAML and / or a trained reward model,
summed per completion. Every failure of a user's function is one line that names it."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from lmtune.config import GrpoConfig
from lmtune.errors import LmtuneError
from lmtune.rl.reward_model import HEAD_FILE, score_texts


def import_reward(spec: str) -> Callable:
    """The function `module:function` names; modules in the working directory are found too."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise LmtuneError(f"grpo.reward '{spec}': write it as module:function (e.g. lmtune.rewards:answer_format)")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # `lmtune train` run next to the user's my_rewards.py
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - an import of user code can fail any way; one line
        raise LmtuneError(f"grpo.reward '{spec}': cannot import {module_name} ({type(err).__name__}: {err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LmtuneError(f"grpo.reward '{spec}': {module_name} has no function {name}")
    return fn


def _checked(spec: str, values: Any, n: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        values = None
    if values is None or len(values) != n:
        got = f"{len(values)} values" if values is not None else type(values).__name__
        raise LmtuneError(f"reward function {spec} returned {got}; it must return a list of {n} floats, "
                          "one per completion")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise LmtuneError(f"reward function {spec} returned {v!r}; every reward must be a finite number")
    return [float(v) for v in values]


class Rewards:
    """The summed reward of each completion, from the configured functions and reward model."""

    def __init__(self, cfg: GrpoConfig, device: torch.device | str = "cpu") -> None:
        if not cfg.reward and cfg.reward_model is None:
            raise LmtuneError("task grpo needs a reward: set grpo.reward=module:function "
                              "(e.g. lmtune.rewards:answer_format) or grpo.reward_model=RUN_DIR")
        self.functions = [(spec, import_reward(spec)) for spec in cfg.reward]
        self.model_dir, self.device, self._model = cfg.reward_model, device, None
        if self.model_dir is not None and not (Path(self.model_dir) / HEAD_FILE).is_file():
            raise LmtuneError(f"grpo.reward_model: {self.model_dir} holds no reward model (no {HEAD_FILE}); "
                              "train one with task: reward")

    def __call__(self, prompts: list, completions: list[str], fields: dict[str, list]) -> torch.Tensor:
        n, total = len(completions), torch.zeros(len(completions))
        self.parts: dict[str, list[float]] = {}  # each reward's values, for the evaluation's breakdown
        for spec, fn in self.functions:
            try:
                values = fn(prompts=prompts, completions=completions, **fields)
            except Exception as err:  # noqa: BLE001 - user code; one line that names it
                raise LmtuneError(f"reward function {spec} raised {type(err).__name__}: {err}") from None
            self.parts[spec.rpartition(":")[2]] = _checked(spec, values, n)
        if self.model_dir is not None:
            self.parts["reward_model"] = self._score(prompts, completions)
        for values in self.parts.values():
            total += torch.tensor(values)
        return total

    def _score(self, prompts: list, completions: list[str]) -> list[float]:
        if self._model is None:
            from lmtune.checkpoint import load

            self._model = load(self.model_dir)
            self._model[0].to(self.device).eval()
        tuned, tokenizer = self._model
        return score_texts(tuned, tokenizer, prompts, completions)
