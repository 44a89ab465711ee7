"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022,
https://arxiv.org/abs/2205.05638).

Update rule: attention modules scale their output, h = l ⊙ (W x + b); feed-forward modules scale their
input, h = W (l ⊙ x) + b. The learned vectors (l_k, l_v, l_ff) are the only parameters that train.
Init: ones (the untrained model is the base model); `random` draws N(0, 1), PEFT's
`init_ia3_weights=False`, for tests. Merging multiplies l into the rows (attention, bias included) or
columns (feed-forward) of W. Checkpoints are PEFT's: one vector per module, `<module>.ia3_l`, shaped
(out, 1) for attention modules and (1, in) for feed-forward modules.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import field_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmtune.errors import LmtuneError
from lmtune.methods import Method, MethodConfig, check_peft_options, register
from lmtune.methods._targets import (
    DEFAULT_IA3_FEEDFORWARD,
    DEFAULT_IA3_TARGETS,
    in_out_features,
    install,
    merge_wrappers,
    resolve_targets,
    valid_targets,
)


class IA3Config(MethodConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: str | list[str] | None = None
    """Module names (`[k_proj, v_proj, down_proj]`), a regex matched against full module paths, or
    `all-linear`; empty means PEFT's default for the architecture (k_proj, v_proj, down_proj on llama)."""
    feedforward_modules: str | list[str] | None = None
    """Which targets scale their input instead of their output: names (a module path ending with one) or a
    regex; empty means PEFT's default for the architecture (down_proj on llama); `[]` means none."""
    init: Literal["ones", "random"] = "ones"
    """`ones` starts as the base model; `random` (N(0, 1), for tests) does not."""

    @field_validator("target_modules", "feedforward_modules")
    @classmethod
    def _valid_regex(cls, v: str | list[str] | None) -> str | list[str] | None:
        return valid_targets(v)


class IA3Linear(nn.Module):
    """A frozen Linear / Conv1D whose output (attention) or input (feed-forward) is scaled by `ia3_l`."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, init: str) -> None:
        super().__init__()
        in_features, out_features = in_out_features(base_layer)
        weight = base_layer.weight
        # fp32 vectors even on a bf16 base (as PEFT does).
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.base_layer = base_layer
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=dtype))
        if init == "random":
            nn.init.normal_(self.ia3_l)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.merged = False
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.disabled:
            self.unmerge()  # the base model was asked for: take the vector back out first
        if self.disabled or self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        y = self.base_layer(x)
        return (y * scale).to(y.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """l shaped to broadcast over the base weight: (out, in) for Linear, (in, out) for Conv1D."""
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        weight.copy_((weight.float() * self._weight_scale().float()).to(weight.dtype))
        if not self.is_feedforward and bias is not None:  # the output scale applies to the bias too
            bias.copy_((bias.float() * self.ia3_l.flatten().float()).to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the vector back out (exact up to rounding, unless an entry of l is ~0)."""
        if not self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        weight.copy_((weight.float() / self._weight_scale().float()).to(weight.dtype))
        if not self.is_feedforward and bias is not None:
            bias.copy_((bias.float() / self.ia3_l.flatten().float()).to(bias.dtype))
        self.merged = False


def _feedforward(model: nn.Module, cfg: IA3Config) -> str | list[str]:
    if cfg.feedforward_modules is not None:
        return cfg.feedforward_modules
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_IA3_FEEDFORWARD:
        raise LmtuneError(f"ia3: no default feed-forward modules for model type '{model_type}'; set "
                          f"method.feedforward_modules (e.g. [down_proj], or [] for none)")
    return DEFAULT_IA3_FEEDFORWARD[model_type]


def is_feedforward(name: str, feedforward: str | list[str]) -> bool:
    """PEFT's rule: a regex must fullmatch the module path; a list entry must end it (no dot needed)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(entry) for entry in feedforward)


def apply(model: nn.Module, cfg: IA3Config) -> None:
    # Build every wrapper before touching the model, so a target that cannot be wrapped leaves it unchanged.
    names = resolve_targets(model, cfg.target_modules, DEFAULT_IA3_TARGETS, "ia3")
    feedforward = _feedforward(model, cfg)
    if isinstance(cfg.feedforward_modules, list):  # PEFT's rule, checked on what matched: ff ⊆ targets
        stray = [e for e in cfg.feedforward_modules if not any(is_feedforward(n, [e]) for n in names)]
        if stray:
            raise LmtuneError(f"ia3: feedforward_modules {stray} must also be in target_modules")
    layers = {name: IA3Linear(model.get_submodule(name), is_feedforward(name, feedforward), cfg.init)
              for name in names}
    install(model, layers)


def merge(model: nn.Module) -> nn.Module:
    return merge_wrappers(model, IA3Linear)


def to_peft(cfg: IA3Config, model: nn.Module) -> dict:
    model_type = model.config.model_type
    targets = cfg.target_modules if cfg.target_modules is not None else DEFAULT_IA3_TARGETS[model_type]
    conv1d = any(m.fan_in_fan_out for m in model.modules() if isinstance(m, IA3Linear))
    return {"target_modules": targets, "feedforward_modules": _feedforward(model, cfg),
            "init_ia3_weights": cfg.init == "ones", "fan_in_fan_out": conv1d, "modules_to_save": None,
            "exclude_modules": None}


_PEFT_KEYS = frozenset({"target_modules", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out"})


def from_peft(peft: dict) -> dict:
    check_peft_options(peft, _PEFT_KEYS)  # modules_to_save, exclude_modules, ...: refused
    return {"name": "ia3", "target_modules": peft.get("target_modules"),
            "feedforward_modules": peft.get("feedforward_modules"),
            "init": "ones" if peft.get("init_ia3_weights", True) else "random"}


register(Method(name="ia3", config=IA3Config, apply=apply, peft_type="IA3", to_peft=to_peft,
                from_peft=from_peft, merge=merge))
