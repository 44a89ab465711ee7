"""Write tuned models: PEFT-format adapters, or whole transformers directories (`checkpoint.py` reads them back).

Every write goes to a temporary directory beside the target and is moved into place file by file
with `os.replace`, `lmtune.json` last: a reader sees either the old file or the new one, and a run
directory without `lmtune.json` is known to be incomplete. This module knows `TunedModel` only as a type,
so `TunedModel.save` can call it without an import circle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from lmtune import quantize
from lmtune.models import DEFAULT_MODEL, cache_dir
from lmtune.rl.reward_model import save_head

if TYPE_CHECKING:
    from lmtune.tuned import TunedModel

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RUN_INFO = "lmtune.json"


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp directory; on success its files replace those in `target`, `lmtune.json` last."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target))
    try:
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda n: n == RUN_INFO)
        for name in names:
            dest = target / name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_state_dict(tuned: TunedModel) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint holds: the trainable parameters, under PEFT's key names."""
    if tuned.method.adapter_state is not None:
        return tuned.method.adapter_state(tuned.model)
    return {PEFT_PREFIX + name: p.detach().contiguous().cpu()
            for name, p in tuned.model.named_parameters() if p.requires_grad}


def _base_model(tuned: TunedModel) -> str | None:
    """The name the user gave, else the directory transformers loaded the model from; None = the default.

    `lmtune.apply(model, ...)` leaves base_name None even for a user's own model, and None would make
    `load` put the adapter on the packaged default. The default itself stays None (its cache may move).
    """
    if tuned.base_name is not None:
        return tuned.base_name
    path = getattr(tuned.model, "name_or_path", "") or None
    default = cache_dir() / "models" / DEFAULT_MODEL
    return None if path is None or Path(path) == default else path


def _peft_config(tuned: TunedModel) -> dict:
    spec = tuned.method
    # Never `default_model_dir()` here: for a model that is not the default it would convert one (~30 s).
    base = _base_model(tuned) or getattr(tuned.model, "name_or_path", "") or None
    fields = spec.to_peft(tuned.method_config, tuned.model) if spec.to_peft else {}
    task = "SEQ_2_SEQ_LM" if tuned.model.config.is_encoder_decoder else "CAUSAL_LM"
    return {"peft_type": spec.peft_type, "task_type": task, "base_model_name_or_path": base,
            "inference_mode": True, "revision": None, **fields}


def save(tuned: TunedModel, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Write `tuned` to `directory`: a PEFT adapter pair, or a whole model for full / freeze."""
    info = {"method": tuned.method_config.model_dump(mode="json"), "base_model": _base_model(tuned)}
    if quantize.settings(tuned.model):  # reloaded the same way, so inference sees the weights training saw
        info["base_quantization"] = quantize.settings(tuned.model)
    with atomic_dir(directory) as tmp:
        if tuned.method.saves_whole_model:
            tuned.model.save_pretrained(tmp)
        else:
            save_file(adapter_state_dict(tuned), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(tuned), indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_head(tuned, tmp)
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2))
