"""Save and load tuned models: PEFT-format adapters, or whole transformers directories (written by `saving.py`).

Every write goes to a temporary directory beside the target and is moved into place file by file
with `os.replace`, `lmtune.json` last: a reader sees either the old file or the new one, and a run
directory without `lmtune.json` is known to be incomplete. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmtune import quantize
from lmtune.errors import LmtuneError
from lmtune.methods import get_method, method_for_peft_type, parse_method_config
from lmtune.models import load_tokenizer, load_weights
from lmtune.rl.reward_model import load_head
from lmtune.runlock import check_new_path, storage_problem
from lmtune.saving import (  # re-exported: the writing half lives in saving.py
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    RUN_INFO,
    adapter_state_dict,
    atomic_dir,
    save,
)
from lmtune.tuned import TunedModel

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "RUN_INFO", "adapter_state_dict", "atomic_dir", "load",
           "load_adapter_weights", "merge_to", "save"]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LmtuneError(f"{path}: cannot read ({err})") from None


def load(directory: str | Path, base: str | None = None,
         dtype: str = "float32") -> tuple[TunedModel, PreTrainedTokenizerBase]:
    """Rebuild a tuned model from an lmtune run or a PEFT adapter directory (on `base` if given)."""
    d = Path(directory)
    if not d.is_dir():
        raise LmtuneError(f"run directory not found: {d}")
    quantization: dict = {}
    if (d / RUN_INFO).is_file():
        info = _read_json(d / RUN_INFO)
        quantization = info.get("base_quantization", {})
        config = parse_method_config(info.get("method"))
        base = base if base is not None else info.get("base_model")
    elif (d / ADAPTER_CONFIG).is_file():
        peft = _read_json(d / ADAPTER_CONFIG)
        spec = method_for_peft_type(str(peft.get("peft_type")))
        try:
            config = parse_method_config(spec.from_peft(peft) if spec.from_peft else {"name": spec.name})
        except LmtuneError as err:
            raise LmtuneError(f"{d / ADAPTER_CONFIG}: {err}") from None
        base = base if base is not None else peft.get("base_model_name_or_path")
    elif (d / "config.json").is_file():
        config, base = parse_method_config("full"), str(d)
    else:
        raise LmtuneError(f"{d} holds no lmtune run, PEFT adapter or transformers model")
    spec = get_method(config.name)
    # The run's own tokenizer when it saved one, else its base model's.
    tokenizer = load_tokenizer(str(d) if (d / "tokenizer_config.json").is_file() else base)
    if spec.saves_whole_model:
        model = load_weights(str(d), dtype=dtype)
        spec.apply(model, config)
        tuned = TunedModel(model, spec, config, base_name=base)
        load_head(tuned, d)
        return tuned, tokenizer
    model = load_weights(base, dtype=dtype, **quantization)
    tuned = TunedModel(model, spec, config, base_name=base)
    spec.apply(model, config)
    load_adapter_weights(tuned, d / ADAPTER_WEIGHTS)
    load_head(tuned, d)
    return tuned, tokenizer


def load_adapter_weights(tuned: TunedModel, path: Path) -> None:
    """Load PEFT-keyed weights into the trainable parameters; every key must fit exactly."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise LmtuneError(f"{path}: cannot read adapter weights ({err})") from None
    if tuned.method.load_adapter_state is not None:
        tuned.method.load_adapter_state(tuned.model, state, str(path))
        return
    params = dict(tuned.model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    found = {key.removeprefix(PEFT_PREFIX) for key in state}
    if found != expected:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LmtuneError(f"{path}: adapter does not fit this base model ({detail}; "
                          f"{len(missing)} missing, {len(unexpected)} unexpected keys)")
    with torch.no_grad():
        for key, value in state.items():
            param = params[key.removeprefix(PEFT_PREFIX)]
            if param.shape != value.shape:
                raise LmtuneError(f"{path}: {key} has shape {tuple(value.shape)} but the base model needs "
                                  f"{tuple(param.shape)}; was the adapter trained on a different model?")
            param.copy_(value.to(param.dtype))


def load_merged(directory: str | Path, base: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A run folded into its base weights, in memory: (plain transformers model, tokenizer)."""
    tuned, tokenizer = load(directory, base)
    tuned.model = quantize.dequantize(tuned.model)  # merging needs float weights; says so when it converts
    return tuned.merge(), tokenizer


def merge_to(directory: str | Path, out: str | Path) -> PreTrainedModel:
    """Merge a run into its base weights and write a plain transformers model + tokenizer to `out`."""
    check_new_path(Path(out), "--out")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise LmtuneError(f"{out} exists and is not empty; merge into a new directory")
    merged, tokenizer = load_merged(directory)
    # Written beside `out` and renamed into place: a killed or failed merge leaves no `out` at all.
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is shared like any other
        os.rename(tmp, target)  # replaces an empty `out`, refuses a non-empty one
    except Exception as err:
        problem = storage_problem(err)
        if problem is None:
            raise
        raise LmtuneError(f"cannot write {out}: {problem}; free disk space or choose a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return merged
