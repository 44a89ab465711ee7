"""The chunked LM-head log-probs against the plain computation (whole logits, torch's cross-entropy)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model
from torch import nn

import lmtune
from lmtune import head as head_module
from lmtune import objectives
from lmtune.head import head_logps, hidden_states_for_head
from lmtune.objectives import sft_loss


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(head_module, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: several chunks, a ragged end


@contextmanager
def _plain(model):
    yield None


def plain(hidden, lin, targets):
    return -F.cross_entropy(lin(hidden).float(), targets, reduction="none")


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_match_plain_head(small_chunks, head_trains, bias):
    torch.manual_seed(0)
    lin = nn.Linear(8, 50, bias=bias).requires_grad_(head_trains)
    hidden = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    upstream = torch.randn(10)  # a non-uniform gradient, as DPO's per-row sums give
    expected = plain(hidden, lin, targets)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, *[p for p in lin.parameters()
                                                                                  if p.requires_grad]])
    actual = head_logps(hidden, lin, targets)
    actual_grads = torch.autograd.grad((actual * upstream).sum(), [hidden, *[p for p in lin.parameters()
                                                                              if p.requires_grad]])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sft_loss_and_gradients_unchanged_on_a_model(small_chunks, method, monkeypatch):
    """sft_loss through the chunked head equals the same model's plain head (tied embeddings: llama config)."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for chunked in (True, False):
        if not chunked:  # the oracle: the whole logits through torch's cross-entropy, as before lmtune.head
            monkeypatch.setattr(objectives, "hidden_states_for_head", _plain)
        tuned = lmtune.apply(build_model("llama"), {"name": method} if method == "full" else
                             {"name": "lora", "r": 4, "init": "random"})
        loss, count, _ = sft_loss(tuned, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tuned.named_parameters() if p.grad is not None}
        results.append((loss.detach(), count, grads))
    (loss_c, count_c, grads_c), (loss_p, count_p, grads_p) = results
    torch.testing.assert_close(loss_c, loss_p, atol=1e-5, rtol=1e-5)
    assert count_c == count_p == 2 * 5
    assert grads_c.keys() == grads_p.keys() and grads_c
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)


def test_logits_changed_after_the_head_keep_the_plain_path():
    """A model that soft-caps its logits after the head (as Gemma 2 does) is seen on the first call and run the
    plain way, then and after: the loss is torch's cross-entropy of its own capped logits."""
    model = build_model("llama")
    original = type(model).forward

    def capped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = torch.tanh(out.logits / 0.1) * 0.1
        return out

    model.forward = capped.__get__(model)
    tuned = lmtune.apply(model, {"name": "lora", "r": 4, "init": "random"})
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        logits = tuned(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    for _ in range(2):  # the first call finds out, the second already knows
        loss, _, _ = sft_loss(tuned, batch)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    with hidden_states_for_head(tuned) as head:
        assert head is None
    with hidden_states_for_head(build_model("llama")) as head:
        assert head is not None and isinstance(head.linear, nn.Linear)
