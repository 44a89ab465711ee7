"""Adapter tuning: bottleneck adapters inside every transformer block (Houlsby et al., 2019,
https://arxiv.org/abs/1902.00751); the single-adapter placement of Pfeiffer et al., 2021,
https://arxiv.org/abs/2005.00247.

Update rule: at each adapter site the block's output h becomes h + W_up f(W_down h + b_down) + b_up,
with W_down: m x d, W_up: d x m (m, the bottleneck, much smaller than the width d), f a non-linearity;
then the block adds its residual as before. Sites: `houlsby` puts one adapter after the attention output
projection and one after the feed-forward block, both before the residual add; `pfeiffer` only the latter.
What trains: the adapters and, with `train_norms`, every normalisation layer (as Houlsby did); a copy of the
base norms is kept so that the disabled model is exactly the base model.
Init: `identity` (W_down kaiming-uniform as in nn.Linear, W_up and biases zero: the untrained model is
exactly the base model), `houlsby` (both truncated N(0, 1e-3^2) as in Houlsby's adapter-bert: near the
identity), `random` (nn.Linear's default for both, for tests). Adapters are non-linear: no merge.
Checkpoints: our own format, peft_type LMTUNE_ADAPTER (described in the README).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from lmtune.errors import LmtuneError
from lmtune.methods import Method, MethodConfig, register
from lmtune.methods._targets import matches, replace_module

FORMAT_VERSION = 1
HOULSBY_STD = 1e-3

# (attention output projection, feed-forward block) per architecture, matched like target_modules.
ADAPTER_SITES: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["self_attn.o_proj"], ["mlp"]),
    "mistral": (["self_attn.o_proj"], ["mlp"]),
    "qwen2": (["self_attn.o_proj"], ["mlp"]),
    "qwen3": (["self_attn.o_proj"], ["mlp"]),
    "gpt2": (["attn.c_proj"], ["mlp"]),
    "gpt_neox": (["attention.dense"], ["mlp"]),
}

NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterConfig(MethodConfig):
    name: Literal["adapter"] = "adapter"
    bottleneck: int | None = Field(None, ge=1)
    """Adapter width m; empty means the model width divided by `reduction_factor`."""
    reduction_factor: int | None = Field(None, ge=1)
    """m = hidden_size // reduction_factor (16 when neither this nor `bottleneck` is set)."""
    nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    """The non-linearity f between the down- and up-projection."""
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """`houlsby`: after the attention output projection and after the feed-forward block; `pfeiffer`: only
    after the feed-forward block."""
    train_norms: bool = True
    """Also train every normalisation layer (LayerNorm / RMSNorm), as Houlsby et al. did."""
    init: Literal["identity", "houlsby", "random"] = "identity"
    """`identity` (W_up = 0: starts as the base model), `houlsby` (tiny random), `random` (for tests)."""
    attention_output_modules: str | list[str] | None = None
    """Where the attention adapters go: module names (`[self_attn.o_proj]`) or a regex over module paths;
    empty means the known one for the architecture."""
    ffn_modules: str | list[str] | None = None
    """Where the feed-forward adapters go (`[mlp]`, or a regex); empty means the known one for the
    architecture. The module's output (a tensor, or a tuple whose first item is one) is adapted."""

    @field_validator("attention_output_modules", "ffn_modules")
    @classmethod
    def _valid_regex(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return v

    @model_validator(mode="after")
    def _one_size(self) -> AdapterConfig:
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("set either bottleneck or reduction_factor, not both")
        return self

    def width(self, hidden_size: int) -> int:
        """The bottleneck m for a model of width `hidden_size`."""
        return self.bottleneck or max(1, hidden_size // (self.reduction_factor or 16))


class BottleneckAdapter(nn.Module):
    """h -> h + W_up f(W_down h + b_down) + b_up."""

    def __init__(self, d: int, m: int, nonlinearity: str, init: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.act = NONLINEARITIES[nonlinearity]()
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        if init == "identity":
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        elif init == "houlsby":
            for layer in (self.down, self.up):
                nn.init.trunc_normal_(layer.weight, std=HOULSBY_STD, a=-2 * HOULSBY_STD, b=2 * HOULSBY_STD)
                nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterSite(nn.Module):
    """A frozen module whose output passes through a bottleneck adapter (skipped while `disabled`)."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        # Adapters stay fp32 on a bf16 base; with W_up = 0 the round trip returns h unchanged.
        return self.adapter(h.to(self.adapter.up.weight.dtype)).to(h.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        if isinstance(out, tuple):  # an attention-style module: (output, weights, ...)
            return (self._adapt(out[0]), *out[1:])
        return self._adapt(out)


class BaseNorms(nn.Module):
    """The base values of the norm parameters that train, so `disabled` can run the true base model.

    Switching swaps each parameter's `.data` (never writes in place), so a graph built before the switch still
    backpropagates into the trained values: a DPO reference pass may sit between a policy forward and backward.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self._params = params  # a plain list: they stay the norm layers' parameters, not this module's
        for i, p in enumerate(params):
            self.register_buffer(f"base_{i}", p.detach().clone(), persistent=False)
        self._trained: list[torch.Tensor] | None = None

    @property
    def disabled(self) -> bool:
        return self._trained is not None

    @disabled.setter
    def disabled(self, value: bool) -> None:
        if value == self.disabled:
            return
        if value:
            self._trained = [p.data for p in self._params]
            for i, p in enumerate(self._params):
                p.data = getattr(self, f"base_{i}")
        else:
            for p, trained in zip(self._params, self._trained, strict=True):
                p.data = trained
            self._trained = None


def _site_patterns(model: nn.Module, cfg: AdapterConfig) -> list[str | list[str]]:
    attention, ffn = cfg.attention_output_modules, cfg.ffn_modules
    needs_attention = cfg.placement == "houlsby"
    if ffn is None or (needs_attention and attention is None):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ADAPTER_SITES:
            raise LmtuneError(f"adapter: lmtune does not know where adapters go in model type '{model_type}'; set "
                              f"method.ffn_modules (e.g. [mlp]) and, for houlsby placement, "
                              f"method.attention_output_modules (e.g. [self_attn.o_proj])")
        known_attention, known_ffn = ADAPTER_SITES[model_type]
        attention = known_attention if attention is None else attention
        ffn = known_ffn if ffn is None else ffn
    return [attention, ffn] if needs_attention else [ffn]


def adapter_sites(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Paths of the modules whose outputs get an adapter, deepest first (so wrapping keeps paths valid)."""
    modules = [name for name, _ in model.named_modules() if name]
    found: set[str] = set()
    for pattern in _site_patterns(model, cfg):
        hits = {name for name in modules if matches(name, pattern)}
        if not hits:
            first_block = sorted({m.group(1) for n in modules if (m := re.search(r"\.0\.([^.]+(\.[^.]+)?)$", n))})
            raise LmtuneError(f"adapter: {pattern!r} matched no module; set method.attention_output_modules / "
                              f"method.ffn_modules to modules of this model's blocks: {', '.join(first_block)}")
        found |= hits
    return sorted(found, key=lambda name: (-name.count("."), name))


def _hidden_size(model: nn.Module) -> int:
    size = getattr(model.config, "hidden_size", None)
    if not isinstance(size, int):
        raise LmtuneError("adapter: the model config has no hidden_size; set method.bottleneck and use a "
                          "model whose config names its width")
    return size


def _norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]


def apply(model: nn.Module, cfg: AdapterConfig) -> None:
    # Find every site and build every adapter before touching the model, so an error leaves it unchanged.
    d = _hidden_size(model)
    weight = next(model.parameters())
    dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
    sites = {name: AdapterSite(model.get_submodule(name),
                               BottleneckAdapter(d, cfg.width(d), cfg.nonlinearity, cfg.init, weight.device, dtype))
             for name in adapter_sites(model, cfg)}
    norms = _norm_parameters(model) if cfg.train_norms else []
    for param in model.parameters():
        param.requires_grad_(False)
    for name, site in sites.items():
        replace_module(model, name, site)
    for param in norms:
        param.requires_grad_(True)
    if norms:
        model.add_module("adapter_base_norms", BaseNorms(norms))


def to_peft(cfg: AdapterConfig, model: nn.Module) -> dict:
    """The method fields of our adapter_config.json, with every default resolved for this model."""
    patterns = _site_patterns(model, cfg)
    return {"format_version": FORMAT_VERSION, "placement": cfg.placement,
            "bottleneck": cfg.width(_hidden_size(model)), "nonlinearity": cfg.nonlinearity, "init": cfg.init,
            "train_norms": cfg.train_norms, "ffn_modules": patterns[-1],
            "attention_output_modules": patterns[0] if cfg.placement == "houlsby" else None}


def from_peft(saved: dict) -> dict:
    version = saved.get("format_version")
    if version != FORMAT_VERSION:
        raise LmtuneError(f"this adapter checkpoint has format_version {version!r}; this lmtune reads "
                          f"version {FORMAT_VERSION}")
    keys = ("placement", "bottleneck", "nonlinearity", "init", "train_norms", "ffn_modules",
            "attention_output_modules")
    return {"name": "adapter", **{key: saved[key] for key in keys if key in saved}}


register(Method(name="adapter", config=AdapterConfig, apply=apply, peft_type="LMTUNE_ADAPTER", to_peft=to_peft,
                from_peft=from_peft, merge=None,
                merge_refusal="bottleneck adapters are non-linear (h + W_up f(W_down h)), so they cannot be "
                              "folded into the base weights; use the run directory itself (lmtune generate RUN_DIR)"))
