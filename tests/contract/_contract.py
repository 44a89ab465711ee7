"""Shared pieces of the contract suite: one configuration per registered method (non-identity: every trainable
parameter is moved off its initial value), the tiny architectures, and a batch."""

from __future__ import annotations

import functools
import re

import torch
from conftest import ARCHS, build_model, build_tokenizer

import lmtune

CASES = {
    "full": {},
    "freeze": {"last_n_layers": 1},
    "lora": {"init": "random", "target_modules": "all-linear", "dropout": 0.0},
    "ia3": {"init": "random"},
    "adapter": {"init": "random"},
    "prompt": {"num_virtual_tokens": 3},
    "p-tuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 8},
    "prefix": {"num_virtual_tokens": 3, "encoder_hidden_size": 8},
    "p-tuning-v2": {"num_virtual_tokens": 3},
}
"""Every registered method (the suite asserts the keys are exactly `method_names()`)."""

LAST_BLOCK = re.compile(r"\.(layers|h)\.1\.")  # the tiny models have two blocks


def base_params_that_train(method: str, model: torch.nn.Module) -> set[str]:
    """Which of the base model's own parameters the method trains (by the method's definition)."""
    names = {name for name, _ in model.named_parameters()}
    if method == "full":
        return names
    if method == "freeze":
        return {n for n in names if LAST_BLOCK.search(n)}
    if method == "adapter":  # Houlsby: adapters and every norm layer
        norms = {prefix for prefix, m in model.named_modules()
                 if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")}
        return {n for n in names if n.rpartition(".")[0] in norms}
    return set()


def tuned(method: str, arch: str, base_name: str | None = None, seed: int = 1) -> lmtune.TunedModel:
    """The method applied to the tiny `arch`, every trainable parameter then moved by noise (non-identity)."""
    torch.manual_seed(seed)
    model = lmtune.apply(build_model(arch), {"name": method, **CASES[method]}, base_name=base_name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@functools.cache
def tokenizer():
    return build_tokenizer()


def sft_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


__all__ = ["ARCHS", "CASES", "base_params_that_train", "left_padded", "sft_batch", "tokenizer", "tuned"]
