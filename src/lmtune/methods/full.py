"""Full fine-tuning: every parameter of the model trains (the seed's 全量微调).

Update rule: W <- W - lr * AdamW(grad W) for all W. Init: the pretrained weights.
Checkpoint: a complete transformers model directory.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from lmtune.methods import Method, MethodConfig, register


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


def apply(model: nn.Module, cfg: FullConfig) -> None:
    for param in model.parameters():
        param.requires_grad_(True)


def merge(model: nn.Module) -> nn.Module:
    """The weights are already plain transformers weights."""
    return model


register(Method(name="full", config=FullConfig, apply=apply, saves_whole_model=True, merge=merge))
