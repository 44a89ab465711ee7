"""Finding the modules a method wraps, by name, on any transformers model (PEFT's matching rules)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from lmtune.errors import LmtuneError

# PEFT's default LoRA targets (peft/utils/constants.py), so `target_modules: null` trains what PEFT would.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
}

# PEFT's default IA3 targets and, among them, the feed-forward modules whose input (not output) is scaled
# (peft/utils/constants.py; causal-LM architectures and T5/BART).
DEFAULT_IA3_TARGETS: dict[str, list[str]] = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "bart": ["q_proj", "v_proj", "fc2"],
}
DEFAULT_IA3_FEEDFORWARD: dict[str, list[str]] = {
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "phi": ["fc2"],
    "opt": ["fc2"],
    "gpt2": ["mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_proj"],
    "gpt_neo": ["c_proj"],
    "gpt_neox": ["dense_4h_to_h"],
    "gptj": ["fc_out"],
    "bloom": ["mlp.dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "t5": ["wo"],
    "mt5": [],
    "bart": ["fc2"],
}

LINEAR_TYPES = (nn.Linear, Conv1D)


def valid_targets(v: str | list[str] | None) -> str | list[str] | None:
    """A config validator's check of `target_modules`-style values: a string other than "all-linear" is a regex."""
    if isinstance(v, str) and v != "all-linear":
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
    return v


def matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex string must fullmatch the module path; a list entry must equal it or its tail."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every Linear / GPT-2 Conv1D except the output head (which `all-linear` leaves alone, as PEFT does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and module is not head:
            yield name, module


def resolve_targets(model: nn.Module, targets: str | list[str] | None, defaults: dict[str, list[str]],
                    method: str) -> list[str]:
    """Module paths to wrap: explicit names / regex / `all-linear`, or PEFT's default for the architecture."""
    if targets is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in defaults:
            raise LmtuneError(f"{method}: no default target modules for model type '{model_type}'; set "
                              f"method.target_modules (e.g. all-linear or a list like [q_proj, v_proj])")
        targets = defaults[model_type]
    if targets == "all-linear":
        found = [name for name, _ in linear_modules(model)]
    else:
        found = [name for name, _ in model.named_modules() if name and matches(name, targets)]
    if not found:
        available = sorted({name.rsplit(".", 1)[-1] for name, _ in linear_modules(model)})
        raise LmtuneError(f"{method}: target_modules {targets!r} matched no module; linear modules here: "
                          f"{', '.join(available)}")
    return found


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear or of GPT-2's Conv1D, whose weight is stored transposed as (in, out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise LmtuneError(f"cannot wrap {type(module).__name__}: only Linear and Conv1D layers are supported")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def install(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Freeze the whole model, then put the (already built) wrappers in place: only their new parameters train."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        replace_module(model, name, layer)


def merge_wrappers(model: nn.Module, wrapper: type[nn.Module]) -> nn.Module:
    """Fold every `wrapper` module into its base layer and put the base layer back in its place."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, wrapper)]:
        _untie(model, module.base_layer)
        module.merge()
        replace_module(model, name, module.base_layer)
    return model


def _untie(model: nn.Module, layer: nn.Module) -> None:
    """A merge rewrites `layer.weight`; when that weight is tied to another module's (an output head tied to
    the input embeddings), the other must keep the old values, so the layer gets its own copy and the saved
    config says the two are no longer tied."""
    weight = layer.weight
    if sum(p is weight for _, p in model.named_parameters(remove_duplicate=False)) < 2:
        return
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
