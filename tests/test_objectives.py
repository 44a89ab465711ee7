"""The SFT objective against a hand calculation on full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model

import lmtune
from lmtune.objectives import sft_loss


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    input_ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0  # a right-padded row
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[1, 6:] = -100
    labels[2, :] = -100
    labels[2, 7] = input_ids[2, 7]  # one labelled token in the last row
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _by_hand(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of -log p(token t+1 | ..t) over labelled t+1, from the model's full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    total, count = torch.zeros(()), 0
    for row in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target != -100:
                total = total - logp[row, t, target]
                count += 1
    return total, count


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_equals_full_logit_cross_entropy(arch: str) -> None:
    tuned = lmtune.apply(build_model(arch), {"name": "lora", "init": "random", "target_modules": "all-linear"})
    batch = _batch()
    total, count, _ = sft_loss(tuned, batch)
    expected, expected_count = _by_hand(tuned, batch)
    assert int(count) == expected_count == 5 + 2 + 1  # rows: 5 completion tokens, 2 before the pads, 1
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-6)
    grads = torch.autograd.grad(total, [p for p in tuned.parameters() if p.requires_grad])
    expected_grads = torch.autograd.grad(expected, [p for p in tuned.parameters() if p.requires_grad])
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


class _FullLogitsOnly(torch.nn.Module):
    """A model that ignores `logits_to_keep`, as some architectures do."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **_ignored):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_sft_loss_falls_back_to_full_logits() -> None:
    model = build_model("llama")
    batch = _batch()
    total, count, _ = sft_loss(_FullLogitsOnly(model), batch)
    expected, expected_count = _by_hand(model, batch)
    assert int(count) == expected_count
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-6)
