"""Quantized base weights through bitsandbytes: 8-bit (LLM.int8) and 4-bit NF4 / FP4 (QLoRA).

The base stays frozen in its quantized form; the method's own parameters (LoRA A / B, IA3 vectors,
prompts ...) stay in fp32 and train on top. bitsandbytes runs on the CPU too (slower than fp32 there:
it dequantizes on the fly), so the same configs work on a laptop and on a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from lmtune.errors import LmtuneError

log = logging.getLogger("lmtune")
QUANTIZATIONS = ("none", "8bit", "4bit")
# bitsandbytes' CPU backend (>= 0.50), on a CPU with AVX512-BF16, looks at import for a faster 4-bit kernel on the
# Hugging Face hub through the optional `kernels` package, and warns when that package is missing. lmtune installs
# no `kernels` (no code is fetched at run time) and keeps bitsandbytes off that kernel (`keep_training_layout`):
# the warning says nothing that applies.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb_config(quantization: str, quant_type: str = "nf4", double_quant: bool = False,
               compute_dtype: torch.dtype = torch.float32) -> BitsAndBytesConfig | None:
    """transformers' quantization config for `quantization` ("none" -> None)."""
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise LmtuneError(f"unknown quantization '{quantization}'; choose one of: {', '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LmtuneError(f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes")
    # LLM.int8 on the CPU casts every input to fp16 and says so on every call; the cast is its design.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def keep_training_layout(model: PreTrainedModel) -> PreTrainedModel:
    """Keep every 4-bit layer on the dequantize-then-matmul path that training takes, in eval and generation too.

    bitsandbytes 0.50 on an AVX512-BF16 CPU repacks a 4-bit weight, at its first no-grad forward in eval mode,
    for a fused bf16 kernel: its block scales are rounded to bf16 for good, so evaluation, generation and any
    training after an evaluation compute with other weights than the run trained on (logits 3e-3 apart on a
    tiny llama), and a layer whose shape is not a multiple of 32 x 64 fails outright ("shape '[32, 0]' is
    invalid"). Switched off, the no-grad forward equals the training forward exactly, on every shape.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_quantized", False))


def settings(model: PreTrainedModel) -> dict:
    """How `model`'s base weights were quantized, as `load_weights` keywords ({} when they are not)."""
    if not is_quantized(model):
        return {}
    q = model.config.quantization_config
    if q.load_in_8bit:
        return {"quantization": "8bit"}
    return {"quantization": "4bit", "quant_type": q.bnb_4bit_quant_type, "double_quant": q.bnb_4bit_use_double_quant}


def dequantize(model: PreTrainedModel) -> PreTrainedModel:
    """Replace the quantized layers by float ones holding the dequantized weights (what the adapter saw)."""
    if not is_quantized(model):
        return model
    kind = model.config.quantization_config
    bits = "4-bit " + kind.bnb_4bit_quant_type.upper() if kind.load_in_4bit else "8-bit"
    log.warning("dequantizing the %s base weights to float32: the merged model holds the weights the adapter "
                "was trained against, not the original full-precision ones", bits)
    return model.dequantize()


def check_method(method: str, trains_base: bool, quantization: str) -> None:
    """Quantized weights cannot take gradients: only methods that freeze the base can train on them."""
    if quantization != "none" and trains_base:
        raise LmtuneError(f"method '{method}' trains the base weights, which cannot be stored in {quantization}; "
                          f"use lora (QLoRA) or another adapter method, or set model.quantization=none")
