"""Training objectives: pure functions of logits and labels, one per task, in a table.

Each returns (summed loss, weight, metrics). The loop divides the sum of a whole optimizer step
by the step's total weight, so gradient accumulation is normalised by token count.
"""

from __future__ import annotations

from collections.abc import Callable

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
    """Supervised fine-tuning: NLL of completion / assistant tokens (all tokens for raw text).

    Only positions whose next token carries loss go through the LM head: with a 49k vocabulary the
    full (batch x seq x vocab) fp32 logits of prompts and padding are most of a step's memory.
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits
    if logits.dim() == 3:  # a model that ignores logits_to_keep returns every position
        total, count = token_nll(logits, labels)
        return total, count, {}
    targets = labels[:, 1:][keep[:, :-1]].to(logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), torch.tensor(targets.numel()), {}


def label_weight(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss in `batch`, known before the forward pass."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


OBJECTIVES: dict[str, Callable] = {"sft": sft_loss}
