"""Supervised fine-tuning and continued pretraining: next-token NLL of the labelled tokens.

`sft` learns the completion / assistant tokens of each record; `pretrain` is the same loss on `{"text"}`
records end to end, cut into blocks of data.max_length (SFT without a prompt mask). Both may pack several
examples into one row; both report perplexity.
"""

from __future__ import annotations

import functools

from lmtune.objectives import sft_kl_loss, sft_loss
from lmtune.tasks import Task, perplexity_eval_row, register


def _sft_objective(cfg):
    """data.preserve.kl adds a KL-to-base term on the preserved answers' rows; without it, the plain loss."""
    kl = cfg.data.preserve.kl if cfg.data.preserve.prompts else 0.0
    return functools.partial(sft_kl_loss, weight=kl) if kl else sft_loss


register(Task(
    name="sft", summary="loss on completions / assistant turns; eval reports loss and perplexity",
    objective=_sft_objective, records="sft", packing=True, eval_row=perplexity_eval_row))
register(Task(
    name="pretrain", summary="text concatenated and cut into blocks of data.max_length, every token learned; eval "
    "reports loss and perplexity",
    objective=lambda cfg: sft_loss, records="pretrain", packing=True, eval_row=perplexity_eval_row))
