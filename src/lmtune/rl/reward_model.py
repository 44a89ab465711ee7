"""Reward model: the base model (any method on its body) + a scalar head read at each row's last real token,
trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)
(Ouyang et al. 2022; TRL's RewardTrainer). The head always trains and is saved as its own safetensors file
next to the adapter (or the whole model, for full fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmtune.data import Example, collate
from lmtune.data.format import RenderOptions, render_pair, tokenize
from lmtune.errors import LmtuneError

HEAD_FILE = "reward_head.safetensors"


def attach_head(tuned: nn.Module) -> nn.Linear:
    """Give `tuned` a trainable nn.Linear(hidden, 1) as `tuned.reward_head` (fp32, on the model's device)."""
    config = tuned.model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head = nn.Linear(hidden, 1)
    with torch.no_grad():  # HF's sequence-classification head init: small normal weights
        head.weight.normal_(std=getattr(config, "initializer_range", 0.02))
        head.bias.zero_()
    tuned.reward_head = head.to(next(tuned.model.parameters()).device)
    return tuned.reward_head


def _tuned(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # unwrap a distributed wrapper


def scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One fp32 score per right-padded row: the head applied to the last real token's final hidden state."""
    tuned = _tuned(model)
    if getattr(tuned, "reward_head", None) is None:
        raise LmtuneError("this model has no reward head; train one with task: reward")
    hidden = tuned.last_hidden_state(input_ids, attention_mask)
    last = attention_mask.sum(dim=1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    head = tuned.reward_head
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def reward_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Bradley-Terry: sum over pairs of -log sigmoid(r_c - r_r - margin); metrics are sums over pairs."""
    chosen, rejected = scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    losses = -F.logsigmoid(chosen - rejected - margin)
    c, r = chosen.detach(), rejected.detach()
    return losses.sum(), torch.tensor(losses.numel()), {
        "accuracy": float((c > r).float().sum()), "margin": float((c - r).sum()),
        "chosen_score": float(c.sum()), "rejected_score": float(r.sum())}


@torch.no_grad()
def reward_accuracy(model: nn.Module, batches, device: torch.device | str = "cpu") -> float:
    """Held-out pair accuracy: the fraction of pairs (batches from `collate_pairs`) scored chosen > rejected."""
    was_training, right, total = model.training, 0, 0
    model.eval()
    for batch in batches:
        chosen, rejected = scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).chunk(2)
        right, total = right + int((chosen > rejected).sum()), total + chosen.numel()
    model.train(was_training)
    return right / max(total, 1)


def save_head(tuned: nn.Module, directory: Path) -> None:
    head = getattr(tuned, "reward_head", None)
    if head is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, Path(directory) / HEAD_FILE, metadata={"format": "pt"})


def load_head(tuned: nn.Module, directory: Path) -> None:
    """Attach and fill the head when the run directory has one."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        return
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as err:
        raise LmtuneError(f"{path}: cannot read the reward head ({err})") from None
    head = attach_head(tuned)
    if state.get("weight") is None or state["weight"].shape != head.weight.shape:
        raise LmtuneError(f"{path}: the reward head does not fit this base model")
    head.load_state_dict(state)


def score_texts(tuned: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list, responses: list[str],
                prompt_format: str = "auto", batch_size: int = 8) -> list[float]:
    """Scores of (prompt, response) pairs, rendered as the reward model's training pairs were."""
    opts, rows = RenderOptions(prompt_format=prompt_format), []
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        record = {"prompt": prompt, "chosen": response or " ", "rejected": response or " "}
        rows.append(tokenize(render_pair(record, tokenizer, opts, f"response {i}")[0], tokenizer))
    device, out = next(tuned.parameters()).device, []
    was_training = tuned.training
    tuned.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate([Example(*r) for r in rows[start:start + batch_size]], tokenizer.pad_token_id)
            out += scores(tuned, batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
    tuned.train(was_training)
    return out
