"""Training objectives: pure functions of a model and a batch (the tasks in `tasks/` bind their options).

Each returns (summed loss, weight, metrics). The loop divides the sum of a whole optimizer step
by the step's total weight, so gradient accumulation is normalised by token count (pairs for the
preference tasks). Metrics are sums over the same weight units; the loop divides them alike.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lmtune.data.format import IGNORE
from lmtune.head import hidden_states_for_head
from lmtune.tasks import reference


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled positions (in fp32), and their count."""
    shifted = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten().to(shifted.device)
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """What the model is called with: a packed batch has position ids and no attention mask."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def _labelled_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every labelled token, its row), labelled tokens in row-major order; `temperature` divides
    the logits (GRPO scores completions under the distribution they were sampled from).

    Only positions whose next token carries loss go through the LM head: with a 49k vocabulary the
    full (batch x seq x vocab) fp32 logits of prompts and padding are most of a step's memory.
    """
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    # The head's own work is done below, in chunks; the chunked head knows no temperature, so GRPO's scaled
    # log-probs take the plain path.
    chunked = hidden_states_for_head(model) if temperature == 1.0 else nullcontext()
    with chunked as head:
        logits = model(**_model_inputs(batch), logits_to_keep=keep).logits
    if head is not None and not head.confirm(logits):  # logits changed after the head: run it the plain way
        head, logits = None, model(**_model_inputs(batch), logits_to_keep=keep).logits
    if logits.dim() == 3:  # a model that ignores logits_to_keep returns every position
        logits = logits[keep.to(logits.device)]
    targets = labels[:, 1:][keep[:, :-1]].to(logits.device)
    rows = keep.nonzero()[:, 0].to(logits.device)
    if head is not None:  # `logits` are the final hidden states
        return head.logps(logits, targets), rows
    return -F.cross_entropy(logits.float() / temperature, targets, reduction="none"), rows


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Supervised fine-tuning and pretraining: NLL of the labelled tokens (completions, assistant turns, text)."""
    logps, _ = _labelled_logprobs(model, batch)
    return -logps.sum(), torch.tensor(logps.numel()), {}


def sft_kl_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                weight: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SFT's loss plus `weight` x KL(reference || model) summed over the labelled tokens of the `anchored` rows
    (data.preserve's base answers); the reference is the model with its method switched off (or a held copy).

    One forward pass gives both terms: the KL needs every labelled position's whole distribution, so the
    chunked head (which yields only the target's log-probability) is not used on these batches.
    """
    anchored = batch.get("anchored")
    if anchored is None or not bool(anchored.any()):
        return sft_loss(model, batch)
    keep = _keep(batch["labels"])
    logits = _kept_logits(model, batch, keep).float()
    targets = batch["labels"][:, 1:][keep[:, :-1]].to(logits.device)
    nll = F.cross_entropy(logits, targets, reduction="sum")
    rows = anchored.to(keep.device)
    sub = {k: v[rows] for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with reference.reference_model(model) as ref:
        ref_logps = F.log_softmax(_kept_logits(ref, sub, keep[rows]).float(), dim=-1)
    kept_rows = keep.nonzero()[:, 0]  # the row of every kept position, in the order of `logits`
    logps = F.log_softmax(logits[rows[kept_rows].to(logits.device)], dim=-1)
    kl = F.kl_div(logps, ref_logps, log_target=True, reduction="sum")
    return nll + weight * kl, targets.new_tensor(targets.numel()), {"preserve_kl": float(kl.detach())}


def _keep(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token carries loss (position t predicts token t + 1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def _kept_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits at the `keep` positions, in row-major order."""
    logits = model(**_model_inputs(batch), logits_to_keep=keep).logits
    return logits[keep.to(logits.device)] if logits.dim() == 3 else logits


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are."""
    logps, rows = _labelled_logprobs(model, batch)
    n = batch["labels"].shape[0]
    sums = torch.zeros(n, device=logps.device, dtype=logps.dtype).index_add(0, rows, logps)
    counts = torch.zeros(n, device=logps.device).index_add(0, rows, torch.ones_like(logps))
    return sums, counts


def _preference_terms(logits: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    """-log sigmoid(beta * logits), with the label flipped with probability `smoothing` (conservative DPO)."""
    return -(1 - smoothing) * F.logsigmoid(beta * logits) - smoothing * F.logsigmoid(-beta * logits)


def _preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, policy: torch.Tensor) -> dict:
    """Sums over pairs of rewards, margins and accuracies (the loop turns them into means)."""
    chosen_logp, rejected_logp = policy.chunk(2)
    return {"rewards/chosen": float(chosen.sum()), "rewards/rejected": float(rejected.sum()),
            "rewards/margin": float((chosen - rejected).sum()),
            "rewards/accuracy": float((chosen > rejected).float().sum()),
            "logp_accuracy": float((chosen_logp > rejected_logp).float().sum())}


def dpo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DPO, sigmoid loss (Rafailov et al. 2023): -log sigmoid(beta * (policy margin - reference margin)).

    The reference log-probs come with the batch when computed before training (methods that change the
    base weights); otherwise from the same model with the method switched off.
    """
    policy, _ = sequence_logps(model, batch)
    if "ref_logps" in batch:
        ref = batch["ref_logps"].to(policy.device)
    else:
        with reference.switched_off(model):
            ref = sequence_logps(model, batch)[0]
    chosen_logp, rejected_logp = policy.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    logits = (chosen_logp - rejected_logp) - (ref_chosen - ref_rejected)
    losses = _preference_terms(logits, beta, label_smoothing)
    chosen_reward = beta * (chosen_logp - ref_chosen).detach()
    rejected_reward = beta * (rejected_logp - ref_rejected).detach()
    return losses.sum(), torch.tensor(losses.numel()), _preference_metrics(chosen_reward, rejected_reward,
                                                                           policy.detach())


def simpo_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (mean logp chosen - mean logp rejected)
    - gamma), the mean taken over each answer's tokens."""
    policy, counts = sequence_logps(model, batch)
    average = policy / counts.clamp(min=1)
    chosen_avg, rejected_avg = average.chunk(2)
    logits = chosen_avg - rejected_avg - gamma / beta
    losses = _preference_terms(logits, beta, label_smoothing)
    metrics = _preference_metrics(beta * chosen_avg.detach(), beta * rejected_avg.detach(), policy.detach())
    return losses.sum(), torch.tensor(losses.numel()), metrics


def label_weight(batch: dict[str, torch.Tensor]) -> int:
    """What the loss is normalised by, known before the forward pass: pairs, else labelled tokens."""
    if "is_chosen" in batch:
        return int(batch["is_chosen"].sum())
    if "loss_units" in batch:  # an objective that averages per sequence first (GRPO's `grpo` loss type)
        return int(batch["loss_units"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in the batch that are not padding."""
    return int(batch["token_mask" if "token_mask" in batch else "attention_mask"].sum())
