"""A merged transformers model as one GGUF file, the format llama.cpp, Ollama and LM Studio load.

Tensor names come from the `gguf` package's own name map (the one llama.cpp's converter uses). llama.cpp's
`llama` architecture applies rotary embeddings to adjacent pairs (Meta's layout) while transformers rotates
the two halves of each head, so the Q and K projections are permuted back per head, as
`convert_hf_to_gguf.py` does; `qwen2` uses the halves layout (NeoX rope) and is written unpermuted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel

from lmtune.errors import LmtuneError
from lmtune.export.vocab import Vocab, write_vocab

log = logging.getLogger("lmtune")
Quant = Literal["f32", "f16", "q8_0"]
QUANTS: tuple[str, ...] = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


@dataclass(frozen=True)
class Arch:
    """How one transformers model type is written."""

    gguf: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp rotates adjacent pairs for this arch: undo transformers' rotate-half layout


ARCHS: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),  # llama.cpp converts Mistral as llama
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}


def arch_of(model: PreTrainedModel) -> Arch:
    kind = model.config.model_type
    if kind not in ARCHS:
        raise LmtuneError(f"GGUF export supports the model types {', '.join(ARCHS)}; this model is '{kind}'")
    return ARCHS[kind]


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half rows of each head -> interleaved pairs (llama.cpp `LlamaModel.permute`)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _rope_fields(writer: gguf.GGUFWriter, config) -> None:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise LmtuneError(f"GGUF export: rope_type '{kind}' is not supported yet (default and linear are)")


def _hparams(writer: gguf.GGUFWriter, config, quant: Quant, name: str) -> None:
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        raise LmtuneError("GGUF export: only SiLU-gated MLPs without bias are supported")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPE[quant])
    _rope_fields(writer, config)


def _encode(array: np.ndarray, quant: Quant) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Norms and biases stay f32 (as llama.cpp writes them); matrices take the asked type, Q8_0 where rows fit."""
    if quant == "f32" or array.ndim == 1:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and array.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), q8), q8
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _tensors(model: PreTrainedModel, arch: Arch):
    """(GGUF name, float32 array) for every weight, Q/K permuted where the arch needs it."""
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(arch.gguf, config.num_hidden_layers)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == in_emb.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq"):
            continue  # llama.cpp reuses token_embd as the output head when `output` is absent
        data = tensor.detach().float().cpu()
        if arch.permute_qk and ".q_proj." in name:
            data = _permute(data, heads)
        elif arch.permute_qk and ".k_proj." in name:
            data = _permute(data, kv)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LmtuneError(f"GGUF export: no llama.cpp tensor for '{name}' in a {config.model_type} model")
        yield target, data.numpy()


def write_gguf(model: PreTrainedModel, vocab: Vocab, path: str, quant: Quant, name: str) -> None:
    """Write `model` (float weights, already merged) and `vocab` to `path`."""
    arch = arch_of(model)
    writer = gguf.GGUFWriter(path, arch=gguf.MODEL_ARCH_NAMES[arch.gguf])
    _hparams(writer, model.config, quant, name)
    write_vocab(writer, vocab)
    for target, array in _tensors(model, arch):
        data, kind = _encode(array, quant)
        writer.add_tensor(target, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
