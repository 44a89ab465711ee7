"""The reference model of DPO-like and RL objectives, decided in one place.

A method that wraps the base (LoRA, IA3, adapters, the prompt family) can be switched off: the reference is
the same model with the method disabled, no second copy in memory. A method that changes the base weights
(full, freeze) cannot: the reference is then either log-probabilities of the fixed training data computed once
before training (`cached`: DPO) or, when the loss needs log-probs of completions sampled during training (GRPO),
a frozen copy of the untrained model (`copy`). Training, the objectives and the memory estimator all ask here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn

Kind = Literal["switch", "cached", "copy"]


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a distributed wrapper holds the tuned model as `module`


def can_switch_off(model: nn.Module) -> bool:
    """Whether the method has a `disabled` switch (adapters, prompt family), so the base is the reference."""
    tuned = _unwrapped(model)
    return any(hasattr(m, "disabled") for m in getattr(tuned, "model", tuned).modules())


def kind(model: nn.Module, cacheable: bool) -> Kind:
    """`switch` when the method can be switched off; else `cached` for log-probs of fixed data, `copy` otherwise."""
    if can_switch_off(model):
        return "switch"
    return "cached" if cacheable else "copy"


@contextmanager
def switched_off(model: nn.Module) -> Iterator[None]:
    """The reference pass: the same model with its method switched off (when it has one), without gradients."""
    tuned = _unwrapped(model)
    with torch.no_grad(), tuned.disabled() if hasattr(tuned, "disabled") else nullcontext():
        yield


def frozen_copy(model: nn.Module) -> nn.Module:
    """The untrained model kept beside the policy, for methods that change the base weights."""
    return copy.deepcopy(_unwrapped(model)).eval().requires_grad_(False)


HELD = "_reference_copy"


def hold_copy_if_needed(model: nn.Module) -> None:
    """For a loss that scores changing data against the reference: keep a frozen copy on the model when the method
    cannot be switched off (not a submodule: it is neither trained, saved nor checkpointed)."""
    if kind(model, cacheable=False) == "copy":
        _unwrapped(model).__dict__[HELD] = frozen_copy(model)


@contextmanager
def reference_model(model: nn.Module) -> Iterator[nn.Module]:
    """The model to score the reference with: the held copy (moved to the policy's device), else the policy itself
    with its method switched off; without gradients either way."""
    held = _unwrapped(model).__dict__.get(HELD)
    if held is None:
        with switched_off(model):
            yield model
        return
    device = next(_unwrapped(model).parameters()).device
    with torch.no_grad():
        yield held.to(device)


def cache_pays(model: nn.Module, visits: int, pairs: int) -> bool:
    """Whether to score the reference once, before training, for fixed pairs: a must for a method that cannot be
    switched off; for one that can, the cache costs one no-grad forward per pair up front and saves one per pair
    per visit, so it pays when training visits the pairs more often than there are pairs (and it is the same
    figure: the switched-off model is the untrained base at every step)."""
    return kind(model, cacheable=True) == "cached" or visits > pairs


@torch.no_grad()
def cache_pair_logps(model: nn.Module, pairs: list, collate_fn: Callable[[list], dict[str, torch.Tensor]],
                     batch_size: int, device: Any,
                     sequence_logps: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]) -> None:
    """`cached`: the reference log-probs of every pair, computed once by the untrained model, travel with the
    pairs (`Pair.ref_logps`; the collate function puts them in the batch as `ref_logps`)."""
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_fn(chunk).items()}
        with switched_off(model) if can_switch_off(model) else nullcontext():
            chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
            pair.ref_logps = (c, r)
    model.train(was_training)
