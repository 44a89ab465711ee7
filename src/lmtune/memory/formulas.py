"""Byte counts for what the CPU trace cannot run, and the terms that hold no tensor.

Sources (see /work/shared/research/memory-accounting.md for the derivations):
- NF4 with double quantisation: 0.5 B per weight + one uint8 absmax per 64 weights + one fp32 per 64*256
  (Dettmers et al. 2023, QLoRA, arXiv:2305.14314 section 3: 4.127 bits per parameter).
- LLM.int8: 1 B per weight + one fp32 scale per output row (bitsandbytes `Int8Params.SCB`).
- 8-bit AdamW: two uint8 states + one fp32 absmax per 256-value block for each state, for tensors of at
  least 4096 values; smaller tensors keep fp32 states (bitsandbytes `optim/optimizer.py`, `min_8bit_size`).
- DDP: a flat gradient bucket per replica, the size of the trainable gradients (torch DDP `Reducer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lmtune.memory.trace import storage_bytes

MIB = 2**20
CPU_OVERHEAD = 40 * MIB
"""Resident memory a CPU training process gains beyond its tensors (autograd engine, oneDNN and OpenMP
buffers, the model's Python objects): 41-51 MiB in five rows of a random 0.2B Llama under the old benchmark's
malloc environment; kept, not refitted, for the 21 `lmtune train` rows of benchmarks/memory_accuracy.py
(2026-12-02), where the estimate is -4.7% to +11.3% of the measured peak."""
CPU_OVERHEAD_SHARE = 0.0
"""Allocator slack in proportion to the tensor peak on CPU (glibc keeps freed chunks), same calibration."""
CUDA_CONTEXT = 500 * MIB
"""CUDA context + cuBLAS workspace: held on the device but not counted by torch.cuda.max_memory_allocated."""
CUDA_ALLOCATOR_SHARE = 0.05
"""Caching-allocator fragmentation, reserved but not allocated (HF model_memory_anatomy: ~5-20%)."""


FILE_FAULT = 2 * MIB
"""The most of a file's cached pages one page fault maps: a PMD-sized folio (measured on Linux 6.18 / ext4: every
lookup of an embedding row brought in the 2 MiB around it; older kernels map 64 KiB, fault_around_bytes)."""


@dataclass
class Swaps:
    """Byte differences between the traced step and the planned run (added to the trace's figures)."""

    weights: int = 0
    optimizer: int = 0
    activations: int = 0
    gradients: int = 0
    notes: list[str] = field(default_factory=list)


def _quantized_linears(model: nn.Module) -> list[nn.Linear]:
    """The frozen Linear layers a bitsandbytes load quantizes: inside the blocks, not the LM head."""
    model = getattr(model, "model", model)  # a TunedModel wraps the transformers model
    out_embed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad
            and m is not out_embed and m.weight.dim() == 2]


def quantized_bytes(weight: torch.Tensor, bits: int) -> int:
    numel = weight.numel()
    if bits == 4:
        return math.ceil(numel / 2) + math.ceil(numel / 64) + 4 * math.ceil(numel / (64 * 256))
    return numel + 4 * weight.shape[0]


def adamw_8bit_bytes(param: torch.Tensor) -> int:
    numel = param.numel()
    if numel < 4096:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)


def unread_embedding(out: Swaps, model: nn.Module, plan, file_dtype, reads_head: bool) -> None:
    """Take off the pages of the input embedding that the run never reads, where the weights stay mapped from
    the safetensors file (CPU, no quantization, no GGUF dequantisation, no dtype conversion) and only the rows
    of the data's tokens are ever looked up: the embedding is frozen and no LM head multiplies by it (an untied
    head, or the reward task's score head). benchmarks/memory_accuracy.py, 2026-12-03: the reward + LoRA and untied
    Qwen2 + LoRA rows, +9.1% / +7.6% counting the whole table (+11% under the allocator setting before), are
    +2.1% / -7.9% with the data's token ids."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    # `file_dtype`: the checkpoint's, read before the traced model was built (building it sets the config's)
    converted = str(file_dtype).removeprefix("torch.") != str(embedding.dtype).removeprefix("torch.")
    if (plan.token_ids is None or plan.device != "cpu" or plan.quantization != "none" or embedding.requires_grad
            or str(plan.model or "").endswith(".gguf") or converted
            or (reads_head and head is not None and head.weight is embedding)):
        return
    whole = embedding.numel() * embedding.element_size()
    row = embedding.shape[1] * embedding.element_size()
    # The windows the rows' first and last bytes fall in, one more for where the table starts in the file.
    windows = {edge // FILE_FAULT for i in plan.token_ids for edge in (i * row, (i + 1) * row - 1)}
    read = min(whole, (len(windows) + 1) * FILE_FAULT)
    out.weights -= whole - read
    out.notes.append(f"input embedding: the data's {len(plan.token_ids):,} token ids of {embedding.shape[0]:,} read "
                     f"from the weights file ({read / 2**20:.0f} of {whole / 2**20:.0f} MiB resident)")


def swaps(tuned: nn.Module, plan) -> Swaps:
    """What to change in the traced figures for 8/4-bit base weights, 8-bit AdamW and data parallelism."""
    out = Swaps()
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    if plan.quantization != "none":
        bits = 4 if plan.quantization == "4bit" else 8
        linears = _quantized_linears(tuned)
        before = storage_bytes(m.weight for m in linears)
        out.weights = sum(quantized_bytes(m.weight, bits) for m in linears) - before
        # Forward and backward dequantize one weight at a time into the compute dtype.
        out.activations = max((m.weight.numel() * m.weight.element_size() for m in linears), default=0)
        out.notes.append(f"{len(linears)} base Linear layers counted at {bits} bit "
                         f"({'NF4 + double quantisation' if bits == 4 else 'LLM.int8'}), by formula")
    if plan.optimizer == "adamw-8bit":
        traced = sum(2 * p.numel() * p.element_size() for p in trainable)  # torch AdamW: m and v in param dtype
        out.optimizer = sum(adamw_8bit_bytes(p) for p in trainable) - traced
        out.notes.append("8-bit AdamW states by formula (bitsandbytes block-wise, 256 values per block)")
    if plan.devices > 1:
        out.gradients = storage_bytes(trainable) if trainable else 0
        out.notes.append(f"data parallel on {plan.devices} devices: each holds a full replica, its own "
                         "micro-batch and a gradient bucket the size of the gradients")
    if plan.packing:
        out.notes.append("packing: every position carries loss, as in the worst case")
    return out


def overhead(device: str, tensor_peak: int) -> int:
    """Memory a run holds besides its tensors, on one device."""
    if device == "cuda":
        return CUDA_CONTEXT + int(CUDA_ALLOCATOR_SHARE * tensor_peak)
    return CPU_OVERHEAD + int(CPU_OVERHEAD_SHARE * tensor_peak)


def converts_gguf(model: str | None) -> bool:
    """Whether loading `model` dequantises a GGUF file: a .gguf path, or the default model before its first
    conversion (`lmtune.models.default_model_dir`)."""
    if model is not None:
        return str(model).endswith(".gguf")
    from lmtune.models import DEFAULT_MODEL, cache_dir

    return not (cache_dir() / "models" / DEFAULT_MODEL / "config.json").is_file()


def _gguf_file_bytes(model: str | None) -> int:
    import importlib.util
    import os

    from lmtune import models

    if model is None:
        spec = importlib.util.find_spec(models._DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            return 0
        model = os.path.join(list(spec.submodule_search_locations)[0], models._DEFAULT_GGUF)
    return os.path.getsize(model) if os.path.isfile(model) else 0


def load_peak(tuned: nn.Module, plan, weights: int, converts: bool, file_dtype) -> int:
    # `weights`: the traced model's weights (unquantized, in the load dtype); `file_dtype`: the checkpoint's.
    """Bytes held while the weights load, when that exceeds holding them.

    - GGUF (`models._load_gguf`): transformers dequantises the file into a model, which is copied into a
      model rebuilt from the config: two sets of weights, plus the file's pages, mapped while it is read.
    - 8/4-bit (bitsandbytes through transformers): the quantizer reads every quantized Linear's weight from
      the mapped safetensors file (its pages stay resident while the file is mapped), and
      `models._own_float_tensors` then copies the unquantized rest (embeddings, norms) out of the mapping:
      source pages of the quantized Linears + the quantized weights + the rest twice.
    - A safetensors file in another dtype than the load's (an fp32 checkpoint loaded in bf16): every tensor is
      read from the mapping (its pages stay resident until the load ends) and a converted copy kept: the file's
      bytes + the weights (measured: DPO + LoRA in bf16 peaked while loading, 797 MiB, above its step's 565).
    A plain safetensors load in the file's own dtype maps the file and copies nothing: no term.
    """
    if converts:
        return 2 * weights + _gguf_file_bytes(plan.model)
    source_size = (getattr(torch, str(file_dtype).removeprefix("torch."), torch.float32).itemsize if file_dtype
                   else 4)
    if plan.quantization == "none":
        base = [p for p in tuned.parameters() if p.element_size() != source_size]  # not fp32 adapters
        return weights + sum(p.numel() for p in base) * source_size if base else 0
    bits = 4 if plan.quantization == "4bit" else 8
    linears = _quantized_linears(tuned)
    source = sum(m.weight.numel() * source_size for m in linears)
    rest = weights - storage_bytes(m.weight for m in linears)
    return source + sum(quantized_bytes(m.weight, bits) for m in linears) + 2 * rest


def sampling_peak(config, shape, held: int, size: int) -> int:
    """GRPO's sampling phase: what is `held` (weights, a reference copy, optimizer states) + the KV cache of
    every completion + one layer's prefill activations (no graph: nothing is saved), `size` bytes a value."""
    if not shape.generation_tokens:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    cache = shape.generation_tokens * text.num_hidden_layers * 2 * kv_heads * head_dim * size
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    prefill = shape.generation_tokens * (4 * text.hidden_size + 3 * intermediate) * size
    return held + cache + prefill


def checkpoint_peak(tuned: nn.Module, held: int, optimizer: int) -> int:
    """The training checkpoint written after the last step (`resume.save_checkpoint`): each file is built in
    memory by `safetensors.torch.save` (a bytes copy of every tensor, then the serialised buffer: twice the
    file), one file at a time, the largest being the optimizer states or the trainable weights."""
    trainable = storage_bytes(p for p in tuned.parameters() if p.requires_grad)
    return held + 2 * max(trainable, optimizer)


def other_phases(tuned: nn.Module, plan, config, shape, step, swaps: Swaps, converts: bool,
                 file_dtype=None) -> dict[str, int]:
    """Peaks of a run outside its training step: loading the weights, sampling (grpo), the checkpoint."""
    optimizer = step.optimizer + swaps.optimizer
    held = step.weights + swaps.weights + step.reference_weights + optimizer
    size = 4 if plan.precision == "fp32" else 2  # the KV cache and activations: the compute dtype
    return {"loading the model": load_peak(tuned, plan, step.weights, converts, file_dtype),
            "sampling completions": sampling_peak(config, shape, held, size),
            "saving the checkpoint": checkpoint_peak(tuned, held, optimizer)}
