"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

Update rule: h = W0 x + (alpha / r) * B A x, with W0 frozen, A: r x in, B: out x r.
What trains: A and B of every targeted Linear / GPT-2 Conv1D; nothing else.
Init (PEFT's options): `kaiming` (A kaiming-uniform, B = 0), `gaussian` (A ~ N(0, 1/r), B = 0),
`random` (B random too, so the adapter is not a no-op; for tests). rsLoRA scales by alpha / sqrt(r).
Checkpoints are PEFT's: parameter names `<module>.lora_A.weight` / `<module>.lora_B.weight`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmtune.errors import LmtuneError
from lmtune.methods import Method, MethodConfig, check_peft_options, register
from lmtune.methods._targets import (
    DEFAULT_LORA_TARGETS,
    in_out_features,
    install,
    merge_wrappers,
    resolve_targets,
    valid_targets,
)


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    """Rank of the update; the seed suggests 4, 8 or 16."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input."""
    target_modules: str | list[str] | None = None
    """Module names (`[q_proj, v_proj]`), a regex matched against full module paths, or `all-linear`;
    empty means PEFT's default for the architecture (q_proj and v_proj on llama)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init: Literal["kaiming", "gaussian", "random"] = "kaiming"
    """Initialisation of A and B (see the module docstring)."""

    @field_validator("target_modules")
    @classmethod
    def _valid_regex(cls, v: str | list[str] | None) -> str | list[str] | None:
        return valid_targets(v)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen Linear / Conv1D plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig) -> None:
        super().__init__()
        in_features, out_features = in_out_features(base_layer)
        weight = base_layer.weight
        # Adapters stay fp32 even on a bf16 base (as PEFT does): their updates are tiny.
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False, device=weight.device, dtype=dtype)
        self.scaling = cfg.scaling
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.merged = False
        self.disabled = False
        self._init(cfg.init, cfg.r)

    def _init(self, init: str, r: int) -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / r)
            nn.init.zeros_(self.lora_B.weight)
        # "random": keep nn.Linear's default init for both, so the update is non-zero.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        if y.dtype in (torch.float16, torch.bfloat16):
            # 16-bit outputs (a bf16 base, or autocast): the adapter runs in that dtype too, its fp32 weights cast
            # (r x features, small) instead of its activations (tokens x features, large), and the scale folded
            # into B: no fp32 copies of x or of the update (measured: 6% of a bf16 LoRA step). Gradients stay as
            # close to the exact ones as PEFT's fp32 adapter path (tests/test_bf16_parity.py); a fused 16-bit
            # addmm did not (1.7x further off under autocast).
            down = F.linear(self.lora_dropout(x), self.lora_A.weight.to(y.dtype))
            return y + F.linear(down, (self.lora_B.weight * self.scaling).to(y.dtype))
        down = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # .to: a no-op but for a fp64 base
        if down.dtype != y.dtype:
            return y + (self.lora_B(down) * self.scaling).to(y.dtype)
        # y + s * down B^T in one GEMM that accumulates into a copy of y: no separate update, scaled update
        # and sum tensors of the layer's full output size (one pass over it instead of four).
        out = torch.addmm(y.flatten(0, -2), down.flatten(0, -2), self.lora_B.weight.t(), alpha=self.scaling)
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """s * B A in fp32, laid out like the base weight (transposed for Conv1D)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
            self.merged = True


def apply(model: nn.Module, cfg: LoraConfig) -> None:
    # Build every wrapper before touching the model, so a target that cannot be wrapped leaves it unchanged.
    names = resolve_targets(model, cfg.target_modules, DEFAULT_LORA_TARGETS, "lora")
    layers = {name: LoraLinear(model.get_submodule(name), cfg) for name in names}
    install(model, layers)


def merge(model: nn.Module) -> nn.Module:
    return merge_wrappers(model, LoraLinear)


_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "random": False}


def to_peft(cfg: LoraConfig, model: nn.Module) -> dict:
    targets = cfg.target_modules
    if targets is None:
        targets = DEFAULT_LORA_TARGETS[model.config.model_type]
    return {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
            "use_rslora": cfg.use_rslora, "init_lora_weights": _PEFT_INIT[cfg.init], "bias": "none",
            "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None}


# PEFT keys lmtune reads, or that matter only at initialisation / with an option refused when set (LoftQ, EVA,
# CorDA, LoRA-GA configs need their init_lora_weights; layers_pattern needs layers_to_transform; QALoRA's group
# size needs use_qalora; Megatron's and the runtime's settings change no output). Any other key set (DoRA,
# aLoRA invocation tokens, rank / alpha patterns, layer replication, biases, ...) is refused.
_PEFT_KEYS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init_lora_weights",
                        "fan_in_fan_out", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                        "layers_pattern", "qalora_group_size", "megatron_core", "runtime_config"})


def from_peft(peft: dict) -> dict:
    check_peft_options(peft, _PEFT_KEYS)
    init = {str(v): k for k, v in _PEFT_INIT.items()}.get(str(peft.get("init_lora_weights", True)))
    if init is None:  # PiSSA, OLoRA, LoftQ, EVA, ...: the adapter goes with a changed base model
        raise LmtuneError(f"this PEFT LORA adapter was initialised with init_lora_weights="
                          f"{peft['init_lora_weights']!r}, which changes the base weights too; lmtune loads adapters "
                          "of an unchanged base (init_lora_weights true, false or 'gaussian')")
    return {"name": "lora", "r": peft["r"], "alpha": peft.get("lora_alpha", 8), "init": init,
            "dropout": peft.get("lora_dropout", 0.0), "target_modules": peft.get("target_modules"),
            "use_rslora": peft.get("use_rslora", False)}


register(Method(name="lora", config=LoraConfig, apply=apply, peft_type="LORA", to_peft=to_peft,
                from_peft=from_peft, merge=merge))
