"""Prefix tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190) and P-tuning v2
(Liu et al., 2022, https://arxiv.org/abs/2110.07602).

Rule: every attention layer l attends over [P_l; x]: trained key/value prefixes P_l^k, P_l^v of
`num_virtual_tokens` positions are put before the real tokens' keys and values; the model is frozen.
Prefix tuning trains them through an MLP reparameterisation, P = MLP(E) with
`Linear(d, h) - Tanh - Linear(h, 2 L d)` (the seed: direct updates are unstable); after training only
P is needed, and that is what the PEFT file holds. P-tuning v2 trains P directly (deep prompts at
every layer, no reparameterisation).
Init (`init`): `vocab` (default) starts P at the model's own keys and values of `num_virtual_tokens` random
vocabulary tokens (Li & Liang's "activations of real words", section 7.4): at step 0 the model sees an ordinary
text prefix, at the scale its attention expects. PEFT's N(0, 1) start (`random`) is ~10x the scale of real
keys/values and raised the held-out loss of the default model from 4.5 to 11.8 before any training. For prefix
tuning the MLP keeps PEFT's init except its last layer, solved (least squares) so that MLP(E) = those
activations exactly; `zero` (P-tuning v2 only) starts at P = 0.
Prefixes are sized `num_key_value_heads * head_dim` (grouped-query attention) and reach the model
through transformers' public Cache API. Checkpoints are PEFT's PREFIX_TUNING (`prompt_embeddings`,
prefix_projection true for `prefix`, false for `p-tuning-v2`).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from lmtune.errors import LmtuneError
from lmtune.methods import Method, register
from lmtune.methods._virtual import (
    VirtualTokenConfig,
    VirtualTokens,
    adapter_state,
    attach,
    check_peft_submodules,
    check_position_room,
    encoder_of,
    extend_inputs,
    load_adapter_state,
    new_embedding,
)

GRADIENT_CHECKPOINTING_REFUSAL = ("prefix methods cannot train with gradient checkpointing (the recomputed layers "
                                  "drop the key/value prefix); turn it off, or use prompt or p-tuning")


class PrefixConfig(VirtualTokenConfig):
    name: Literal["prefix"] = "prefix"
    init: Literal["vocab", "random"] = "vocab"
    """Initial prefixes: `vocab` (the model's own keys/values of random vocabulary tokens: MLP(E) starts there) or
    `random` (PEFT's default MLP init)."""
    encoder_hidden_size: int | None = Field(None, ge=1)
    """Hidden size of the reparameterisation MLP; empty means the prefix width (PEFT's default)."""


class PTuningV2Config(VirtualTokenConfig):
    name: Literal["p-tuning-v2"] = "p-tuning-v2"
    init: Literal["vocab", "random", "zero"] = "vocab"
    """Initial prefixes: `vocab` (the model's own keys/values of random vocabulary tokens), `random` N(0, 1)
    (PEFT's default; ~10x the scale of real keys/values) or `zero`."""


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the (decoder's) self-attention: what one layer's prefix is shaped by."""
    config = model.config
    if not config.is_encoder_decoder:  # (BART's decoder view of its config loses the decoder_* fields)
        config = config.get_text_config(decoder=True)

    def first(*names: str) -> int | None:
        return next((v for v in (getattr(config, n, None) for n in names) if v), None)

    heads = first("decoder_attention_heads", "num_attention_heads")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim", "d_kv") or config.hidden_size // heads
    return first("num_decoder_layers", "decoder_layers", "num_hidden_layers"), kv_heads, head_dim


def _cache_argument(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise LmtuneError(f"{type(model).__name__} takes no key/value cache, so prefix methods cannot apply to it; "
                      "use prompt or p-tuning")


def check_cache(model: nn.Module) -> None:
    """Refuse architectures whose cache is not one plain key/value list per layer (linear attention, KV sharing)."""
    _cache_argument(model)
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers} - {DynamicLayer.__name__, DynamicSlidingWindowLayer.__name__}
    if odd:
        raise LmtuneError(f"{model.config.model_type} uses {', '.join(sorted(odd))} attention caches, which cannot "
                          "take a key/value prefix; use prompt or p-tuning")


def check_gradient_checkpointing(model: nn.Module) -> None:
    """Raise when gradient checkpointing is on: the trainer may call it before training starts."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # renamed in transformers 5; the old name warns
    if getattr(model, name, False):
        raise LmtuneError(GRADIENT_CHECKPOINTING_REFUSAL)


def _width(model: nn.Module) -> tuple[int, int]:
    layers, kv_heads, head_dim = geometry(model)
    return kv_heads * head_dim, 2 * layers * kv_heads * head_dim


def real_key_values(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids, table): `n` random vocabulary tokens and the keys/values the model computes for them at positions
    0..n-1, one row per position in the prefix layout (slot 2l layer l's key, 2l + 1 its value). Prepending this
    table is exactly prepending those tokens. None under a fake / meta model (the memory estimate computes nothing)."""
    weight = model.get_input_embeddings().weight
    if is_fake(weight) or weight.device.type == "meta":
        return None
    check_position_room(model, n, 0)
    ids = torch.randint(0, weight.shape[0], (1, n), device=weight.device)
    inputs = {"input_ids": ids, "use_cache": True, "return_dict": True}
    if model.config.is_encoder_decoder:  # the prefix sits in the decoder's self-attention
        inputs["decoder_input_ids"] = ids
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5
    model.train(training)
    cache = getattr(cache, "self_attention_cache", cache)
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])  # (2L, H, n, D)
    return ids[0].cpu(), kv.permute(2, 0, 1, 3).reshape(n, -1).float()


@torch.no_grad()
def _solve_last_layer(head: nn.Sequential, embedding: nn.Embedding, target: torch.Tensor) -> None:
    """Set the MLP's last Linear so that head(E) = target: min-norm least squares on [tanh(W1 E + b1), 1]
    (exact while num_virtual_tokens <= hidden + 1). The first layer and E keep PEFT's init, so every part trains."""
    hidden = head[1](head[0](embedding.weight))
    features = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
    solution = torch.linalg.pinv(features) @ target.to(features)  # (hidden + 1, out)
    head[2].weight.copy_(solution[:-1].T)
    head[2].bias.copy_(solution[-1])


def apply_prefix(model: nn.Module, cfg: PrefixConfig) -> None:
    check_cache(model)
    token_dim, out = _width(model)
    hidden = cfg.encoder_hidden_size or token_dim
    start = real_key_values(model, cfg.num_virtual_tokens) if cfg.init == "vocab" else None
    embedding = new_embedding(model, cfg.num_virtual_tokens, token_dim)
    # Built on the embedding's device, not moved there: `.to()` cannot swap fake tensors (memory estimate).
    with torch.device(embedding.weight.device):
        head = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
    if start is not None:
        _solve_last_layer(head, embedding, start[1])
    attach(model, VirtualTokens(embedding, head, init_ids=None if start is None else start[0]))


def apply_p_tuning_v2(model: nn.Module, cfg: PTuningV2Config) -> None:
    check_cache(model)
    start = real_key_values(model, cfg.num_virtual_tokens) if cfg.init == "vocab" else None
    embedding = new_embedding(model, cfg.num_virtual_tokens, _width(model)[1])
    if cfg.init == "zero":
        nn.init.zeros_(embedding.weight)
    elif start is not None:
        with torch.no_grad():
            embedding.weight.copy_(start[1])
    attach(model, VirtualTokens(embedding, init_ids=None if start is None else start[0]))


def build_cache(model: nn.Module, table: torch.Tensor, batch: int, dtype: torch.dtype) -> Cache:
    """A cache holding the prefix: row t of `table` is position t's keys and values, layer by layer (PEFT's order:
    slot 2l is layer l's key, 2l + 1 its value). Encoder-decoder models get it in the decoder's self-attention."""
    layers, kv_heads, head_dim = geometry(model)
    n = table.shape[0]
    kv = table.to(dtype).view(n, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, n, D)
    seq2seq = model.config.is_encoder_decoder
    cache = DynamicCache() if seq2seq else DynamicCache(config=model.config)
    for layer in range(layers):
        keys, values = (kv[2 * layer + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
        cache.update(keys, values, layer)
    return EncoderDecoderCache(cache, DynamicCache()) if seq2seq else cache


def prepare_inputs(model: nn.Module, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The hook: the prefix goes in as the cache of n past positions; mask and positions are extended."""
    encoder = encoder_of(model)
    if encoder.disabled:
        return inputs, 0
    if model.training and torch.is_grad_enabled():
        check_gradient_checkpointing(model)
    ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    shaped = ids if ids is not None else embeds
    batch, length = shaped.shape[:2]
    n = encoder.num_virtual_tokens
    check_position_room(model, n, length)
    dtype = model.get_input_embeddings().weight.dtype
    inputs[_cache_argument(model)] = build_cache(model, encoder(), batch, dtype)
    if model.config.is_encoder_decoder:  # x's mask is the encoder's; the decoder sees its cache whole
        return inputs, 0
    return extend_inputs(inputs, n, batch, length, shaped.device, in_sequence=False), 0


def _peft_common(cfg: VirtualTokenConfig, model: nn.Module, projection: bool) -> dict:
    layers, kv_heads, _ = geometry(model)
    token_dim = _width(model)[0]
    return {"num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": kv_heads, "num_layers": layers,
            "modules_to_save": None, "prefix_projection": projection,
            "encoder_hidden_size": getattr(cfg, "encoder_hidden_size", None) or token_dim}


def prefix_to_peft(cfg: PrefixConfig, model: nn.Module) -> dict:
    return _peft_common(cfg, model, projection=True)


def p_tuning_v2_to_peft(cfg: PTuningV2Config, model: nn.Module) -> dict:
    return {**_peft_common(cfg, model, projection=False), "init_weights": "zero" if cfg.init == "zero" else None}


def prefix_from_peft(peft: dict) -> dict:
    """PEFT has one type for both: prefix_projection tells prefix tuning (MLP) from P-tuning v2."""
    check_peft_submodules(peft, frozenset({"prefix_projection", "encoder_hidden_size", "init_weights"}))
    # The file holds the trained prefix; the init only mattered before training (`random` computes nothing).
    if peft.get("prefix_projection"):
        return {"name": "prefix", "num_virtual_tokens": peft["num_virtual_tokens"],
                "encoder_hidden_size": peft.get("encoder_hidden_size"), "init": "random"}
    return {"name": "p-tuning-v2", "num_virtual_tokens": peft["num_virtual_tokens"], "init": "random"}


_SHARED = {"peft_type": "PREFIX_TUNING", "from_peft": prefix_from_peft, "prepare_inputs": prepare_inputs,
           "adapter_state": adapter_state, "load_adapter_state": load_adapter_state,
           "merge_refusal": "key/value prefixes are extra positions, not a change of the weights",
           "gradient_checkpointing_refusal": GRADIENT_CHECKPOINTING_REFUSAL}
register(Method(name="prefix", config=PrefixConfig, apply=apply_prefix, to_peft=prefix_to_peft, **_SHARED))
register(Method(name="p-tuning-v2", config=PTuningV2Config, apply=apply_p_tuning_v2, to_peft=p_tuning_v2_to_peft,
                **_SHARED))
