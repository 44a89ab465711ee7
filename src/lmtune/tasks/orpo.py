"""ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691): SFT and preference alignment in one loss, with
no reference model, from `{"prompt", "chosen", "rejected"}` pairs.

    loss = NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)),
    log odds(y) = log p(y) - log(1 - p(y)),  p(y) = exp(mean log-prob of the answer's tokens)

As TRL's ORPOTrainer (and the paper's code) compute it: the NLL is the mean over every token of the chosen rows,
prompt included (TRL #1516; reverted back to this in #2527), the odds use the answer tokens only. `beta`
(lambda in the paper) is `preference.beta`, default 0.1. One forward pass scores the whole chosen and rejected
rows; the loop divides by pairs. Eval reports the loss, rewards = beta * mean log-prob of each answer, their
margin and accuracy (chosen > rejected), the NLL and the log odds ratio.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lmtune.data.format import IGNORE
from lmtune.objectives import _labelled_logprobs
from lmtune.tasks import Task, register


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
              beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(summed loss, pairs, metrics) on a batch of chosen rows then rejected rows (`collate_pairs`)."""
    labels, mask = batch["labels"], batch["attention_mask"]
    every_token = batch["input_ids"].masked_fill(mask == 0, IGNORE)  # the NLL reads prompt and answer
    logps, rows = _labelled_logprobs(model, {**batch, "labels": every_token})
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = every_token[:, 1:] != IGNORE
    in_answer = (labels[:, 1:] != IGNORE)[keep[:, :-1]].to(logps.device)
    n, pairs = labels.shape[0], labels.shape[0] // 2
    zeros = torch.zeros(n, device=logps.device, dtype=logps.dtype)
    answer_sum = zeros.index_add(0, rows[in_answer], logps[in_answer])
    answer_len = zeros.index_add(0, rows[in_answer], torch.ones_like(logps[in_answer]))
    mean_logp = (answer_sum / answer_len.clamp(min=1)).float()
    chosen, rejected = mean_logp.chunk(2)
    in_chosen = rows < pairs
    nll = -logps[in_chosen].float().mean()  # one mean over every chosen token of the batch, as TRL's
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = pairs * nll - beta * ratio.sum()
    c, r = beta * chosen.detach(), beta * rejected.detach()
    return loss, torch.tensor(pairs), {
        "rewards/chosen": float(c.sum()), "rewards/rejected": float(r.sum()), "rewards/margin": float((c - r).sum()),
        "rewards/accuracy": float((c > r).float().sum()), "nll": pairs * float(nll.detach()),
        "log_odds_ratio": float(ratio.detach().sum()), "log_odds_chosen": float(log_odds.detach().sum())}


def _beta(cfg) -> float:
    return cfg.preference.beta if cfg.preference.beta is not None else 0.1


register(Task(
    name="orpo", summary="SFT + odds-ratio preference loss, no reference model (preference.beta = lambda); eval "
    "reports loss, rewards, accuracy, nll and log odds ratio",
    objective=lambda cfg: functools.partial(orpo_loss, beta=_beta(cfg)), section="preference", records="pairs",
    memory_task="simpo"))  # chosen + rejected through the LM head, no reference
