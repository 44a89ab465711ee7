"""LoRA in bf16 against PEFT in bf16 on the same weights: bf16 rounds both (an 8-bit mantissa), differently, so
the oracle is the same model computed exactly (fp32, the same weights): lmtune's logits, loss and adapter
gradients must be no further from it than PEFT's are. On the CPU always; on a CUDA GPU when there is one."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict

import lmtune

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PEFT_PREFIX = "base_model.model."


def _pair(precision: str, device: str):
    """lmtune's and PEFT's LoRA (random init, so the adapter matters) on the same base, in `precision`."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peft = get_peft_model(build_model("llama").to(device, dtype),
                          PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"))
    ours = lmtune.apply(build_model("llama").to(device, dtype), {"name": "lora", "r": 4, "alpha": 8,
                                                                 "init": "random", "target_modules": "all-linear"})
    params = dict(ours.model.named_parameters())
    with torch.no_grad():
        for key, value in get_peft_model_state_dict(peft).items():
            params[key.removeprefix(PEFT_PREFIX)].copy_(value)
    return ours, peft


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_lora_matches_peft_in_bf16(precision, device):
    ours, peft = _pair(precision, device)
    assert all(p.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)  # fp32 adapters, as PEFT
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        a = ours(ids, mask, labels)
        b = peft(input_ids=ids, attention_mask=mask, labels=labels)
    exact_logits, exact_loss, exact = _exact(ours, ids, mask, labels)
    real = mask.bool()
    err = {side: float((out.logits.float() - exact_logits)[real].norm() / exact_logits[real].norm())
           for side, out in (("ours", a), ("peft", b))}
    assert err["ours"] <= 1.25 * err["peft"] + 1e-3, err
    assert abs(a.loss.item() - exact_loss) <= 1.25 * abs(b.loss.item() - exact_loss) + 1e-3 * exact_loss
    a.loss.backward()
    b.loss.backward()
    theirs = {n.removeprefix(PEFT_PREFIX).replace(".default.", "."): p.grad for n, p in peft.named_parameters()
              if p.requires_grad}
    mine = {n: p.grad for n, p in ours.model.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() == exact.keys()
    errors = {"ours": [], "peft": []}
    for name, truth in exact.items():
        assert truth.abs().max() > 0, name
        for side, grads in (("ours", mine), ("peft", theirs)):
            errors[side].append(float((grads[name].float() - truth).norm() / truth.norm()))
    # bf16 rounds each gradient by a few percent on either side (measured: 1-5% per tensor on both); lmtune's
    # must be as close to the exact ones as PEFT's on the whole, and no tensor far off.
    assert sum(errors["ours"]) <= 1.25 * sum(errors["peft"]), errors
    assert max(errors["ours"]) < 0.1, errors


def _exact(tuned, ids, mask, labels) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """The same model in fp32 (the bf16 base weights upcast exactly), no autocast: the oracle's logits, loss and
    adapter gradients."""
    import copy

    exact = copy.deepcopy(tuned).float()
    for p in exact.parameters():
        p.grad = None
    out = exact(ids, mask, labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in exact.model.named_parameters() if p.requires_grad}
    return out.logits.detach(), float(out.loss), grads
