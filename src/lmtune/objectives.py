"""Training objectives: pure functions of logits and labels, one per task, in a table.

Each returns (summed loss, weight, metrics). The loop divides the sum of a whole optimizer step
by the step's total weight, so gradient accumulation is normalised by token count.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lmtune.data.format import IGNORE


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled positions (in fp32), and their count."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten().to(shifted.device)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Supervised fine-tuning: NLL of completion / assistant tokens (all tokens for raw text)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count = token_nll(logits, batch["labels"])
    return total, count, {}


def label_weight(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss in `batch`, known before the forward pass."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


OBJECTIVES: dict[str, Callable] = {"sft": sft_loss}
