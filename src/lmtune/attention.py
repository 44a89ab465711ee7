"""transformers' SDPA attention, with one CPU case chosen by measurement: short 16-bit sequences run in fp32.

PyTorch's CPU flash-attention kernel has a high fixed cost per block in bf16: measured here (one thread, causal
GQA, 4 x 9 heads x 64, forward + backward) bf16 takes 10.1 ms at 81 tokens where the same inputs upcast to fp32
take 3.6 ms, and the two meet near 256 tokens (21.9 vs 23.8 ms); beyond, bf16 wins (512: 57.9 vs 78.2 ms).
So on the CPU, 16-bit queries of at most `FP32_UP_TO` positions are upcast, attended in fp32 (exactly, at
least as precise as bf16) and cast back; everything else — longer sequences, GPUs, fp32 — is transformers'
own `sdpa_attention_forward`, unchanged. Models whose attention is `sdpa` get this as `lmtune_sdpa` (same
masks as sdpa); the name is not saved with the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "lmtune_sdpa"
FP32_UP_TO = 256
"""Longest query (positions) that a 16-bit CPU attention runs in fp32: the measured crossover."""


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    short = query.shape[-2] <= FP32_UP_TO
    if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and short:
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
        return out.to(query.dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use(model: nn.Module) -> nn.Module:
    """Switch every sdpa attention of `model` (and its sub-configs) to `lmtune_sdpa`; returns the model."""
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = NAME
    return model
