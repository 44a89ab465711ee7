"""Partial fine-tuning by selection (the seed's 部分微调): freeze everything, train a chosen part.

Update rule: W <- W - lr * AdamW(grad W) for W in the selection S; all other weights stay fixed.
S is the union of: the last N transformer blocks (`last_n_layers`) and parameters whose names
match a regex (`patterns`); with `bitfit`, S keeps only norm weights and biases (BitFit, Ben Zaken
et al., 2021, https://arxiv.org/abs/2106.10199) — of the whole model when nothing else is chosen.
Checkpoint: a complete transformers model directory.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from torch import nn

from lmtune.errors import LmtuneError
from lmtune.methods import Method, MethodConfig, register


class FreezeConfig(MethodConfig):
    name: Literal["freeze"] = "freeze"
    last_n_layers: int | None = Field(None, ge=1)
    """Train the last N transformer blocks."""
    patterns: list[str] = []
    """Also train parameters whose names match any of these regexes (searched), e.g. `norm` or `embed_tokens`."""
    bitfit: bool = False
    """Keep only norm weights and biases of the selection (of the whole model when nothing else is chosen)."""

    @field_validator("patterns")
    @classmethod
    def _valid_regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"'{pattern}' is not a valid regular expression ({err})") from None
        return v


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the longest ModuleList with one entry per layer."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    candidates = [(name, m) for name, m in lists if len(m) == n_layers] or lists
    if not candidates:
        raise LmtuneError("freeze: cannot find this model's transformer blocks; use method.patterns instead")
    return max(candidates, key=lambda item: len(item[1]))


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    names = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def select(model: nn.Module, cfg: FreezeConfig) -> set[str]:
    """Names of the parameters that train."""
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    if cfg.last_n_layers is not None:
        prefix, layers = decoder_layers(model)
        if not 1 <= cfg.last_n_layers <= len(layers):
            raise LmtuneError(f"config: 'method.last_n_layers': must be between 1 and {len(layers)}, "
                              f"the model's layer count (got {cfg.last_n_layers})")
        first = len(layers) - cfg.last_n_layers
        starts = tuple(f"{prefix}.{i}." for i in range(first, len(layers)))
        chosen.update(n for n in names if n.startswith(starts))
    for pattern in cfg.patterns:
        hits = {n for n in names if re.search(pattern, n)}
        if not hits:
            raise LmtuneError(f"freeze: pattern '{pattern}' matches no parameter (e.g. {names[-1]})")
        chosen |= hits
    if cfg.bitfit:
        norm_bias = _norm_and_bias_names(model)
        chosen = (chosen & norm_bias) if chosen else norm_bias
    elif cfg.last_n_layers is None and not cfg.patterns:
        raise LmtuneError("freeze: choose what trains with method.last_n_layers, method.patterns or method.bitfit")
    if not chosen:
        raise LmtuneError("freeze: the selection contains no parameter")
    return chosen


def apply(model: nn.Module, cfg: FreezeConfig) -> None:
    chosen = select(model, cfg)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)


def merge(model: nn.Module) -> nn.Module:
    """The weights are already plain transformers weights."""
    return model


register(Method(name="freeze", config=FreezeConfig, apply=apply, saves_whole_model=True, merge=merge))
