"""GRPO's loss (Shao et al. 2024, DeepSeekMath) on a batch of sampled completions, as TRL's GRPOTrainer
computes it (token-level importance ratio, two-sided clip, k3 KL estimator, `dapo` or `grpo` averaging).

Per completion token t of completion i with advantage A_i:
    ratio = exp(logp_t - old_logp_t)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (k3)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * kl_t
`dapo` sums loss_t over every completion token of the optimizer step and divides by their count (the loop's
token normalisation); `grpo` averages within each completion, then over completions.
"""

from __future__ import annotations

import torch

from lmtune.objectives import _labelled_logprobs


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each row's group std): rewards minus their group's mean, over the group's std + 1e-4
    when `scale` (Bessel-corrected, as TRL). Rows are grouped consecutively, `group_size` per prompt."""
    grouped = rewards.float().view(-1, group_size)
    std = grouped.std(dim=1, keepdim=True).expand_as(grouped)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std + 1e-4)
    return advantages.flatten(), std.flatten()


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the completion tokens (labels), row-major, at `temperature`."""
    return _labelled_logprobs(model, batch, temperature)[0]


def grpo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], epsilon: float = 0.2, beta: float = 0.04,
              temperature: float = 1.0, loss_type: str = "dapo") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(summed loss, weight, metrics) for the loop: weight is completion tokens (`dapo`) or completions (`grpo`).

    The batch holds `advantages` per row; `old_logps` (the sampling policy's, only when it was stepped since:
    num_iterations > 1; otherwise the current log-probs detached, ratio 1) and `ref_logps` per completion token.
    """
    logps, rows = _labelled_logprobs(model, batch, temperature)
    old = batch["old_logps"].to(logps.device) if "old_logps" in batch else logps.detach()
    advantages = batch["advantages"].to(logps.device)[rows]
    ratio = torch.exp(logps - old)
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    kl = None
    if beta != 0.0:
        delta = batch["ref_logps"].to(logps.device) - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    n_rows = batch["labels"].shape[0]
    if loss_type == "grpo":
        sums = torch.zeros(n_rows, device=logps.device).index_add(0, rows, per_token)
        counts = torch.zeros(n_rows, device=logps.device).index_add(0, rows, torch.ones_like(per_token))
        loss, weight = (sums / counts.clamp(min=1)).sum(), n_rows
    else:
        loss, weight = per_token.sum(), logps.numel()
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    means = {"clip_fraction": float(clipped.float().mean()),
             "completion_length": logps.numel() / n_rows}
    if kl is not None:
        means["kl"] = float(kl.detach().mean())
    for key, name in (("rewards", "reward"), ("group_std", "reward_std")):
        if key in batch:
            means[name] = float(batch[key].float().mean())
    # The loop divides metrics by the step's total weight: each mean enters weighted by this batch's share.
    return loss, torch.tensor(weight), {name: value * weight for name, value in means.items()}
