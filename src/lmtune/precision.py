"""`train.precision: auto` (the default): the fastest precision the device runs well, decided from what it has.

bf16 pays only where the hardware multiplies bf16 natively: CUDA GPUs of compute capability 8.0 or newer
(Ampere, Hopper, ...) and CPUs with AMX-BF16 or AVX512-BF16. There a bf16 Linear forward + backward runs ~4x the
fp32 rate (measured here on an AMX CPU); elsewhere bf16 is emulated and slower than fp32, so auto picks fp32.
On a fast-bf16 device:
- methods that leave the base weights frozen (LoRA, IA3, adapters, the prompt family) get `bf16`: base weights
  stored in bf16 (half the memory, no per-step weight casts), their own parameters kept in fp32;
- methods that train base weights (full, freeze) get `bf16-mixed`: fp32 master weights, since AdamW updates in
  bf16 round away (a weight of 1.0 cannot move by less than 2**-8), and bf16 matmuls under autocast;
- a quantized base keeps fp32 (bitsandbytes' CPU kernels were not measured faster in bf16), as does a model
  the user asked to load in another dtype (`model.dtype`), which decides instead.
`LMTUNE_FAST_BF16=0` (or `1`) overrides the detection, e.g. to compare runs across machines.
"""

from __future__ import annotations

import os

import torch

from lmtune.errors import LmtuneError

FAST_BF16_ENV = "LMTUNE_FAST_BF16"


def fast_bf16(device: str) -> tuple[bool, str]:
    """Whether `device` ("cpu" or "cuda") multiplies bf16 natively, and the evidence in words."""
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{FAST_BF16_ENV}={forced}"
    if forced:  # a typo must not silently fall back to detection
        raise LmtuneError(f"{FAST_BF16_ENV}={forced!r}: set it to 1 (bf16 is fast here), 0 (it is not), or unset it "
                          "to detect")
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        if major >= 8:
            return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return False, f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores"
    if torch.cpu._is_amx_tile_supported():
        return True, "this CPU has AMX (bf16 tile matmuls)"
    if torch.cpu._is_avx512_bf16_supported():
        return True, "this CPU has AVX512-BF16"
    return False, "this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)"


def train_device(cfg) -> str:
    """The device a run trains on, as accelerate will pick it."""
    return "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"


def resolve(cfg) -> tuple[str, str]:
    """The precision a run uses and why; `train.precision` other than `auto` is used as given."""
    asked = cfg.train.precision
    if asked != "auto":
        return asked, "as configured"
    if cfg.model.dtype != "float32":
        return ("bf16" if cfg.model.dtype == "bfloat16" else "fp32"), f"model.dtype={cfg.model.dtype} decides"
    if cfg.model.quantization != "none":
        return "fp32", f"a {cfg.model.quantization} base computes in fp32 (bf16 not measured faster there)"
    fast, why = fast_bf16(train_device(cfg))
    if not fast:
        return "fp32", why
    from lmtune.methods import get_method  # here, not at import: the registry imports the methods

    if get_method(cfg.method.name).saves_whole_model:
        return "bf16-mixed", f"{why}; {cfg.method.name} trains base weights, so fp32 master weights"
    return "bf16", f"{why}; frozen base weights in bf16, {cfg.method.name}'s own parameters in fp32"
