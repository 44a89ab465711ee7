"""The method contract, for every registered method on every tiny architecture (llama, qwen2, mistral, gpt2,
gpt_neox): only the intended parameters train; switched off equals the base model; save -> load gives the same
logits; merged equals unmerged; greedy generation equals the teacher-forced argmax. Each starts from a
non-identity state (every trainable parameter moved off its init), so none of them passes vacuously."""

from __future__ import annotations

import copy

import pytest
import torch
from _contract import ARCHS, CASES, base_params_that_train, left_padded, sft_batch, tokenizer, tuned
from conftest import build_model, logits

import lmtune
from lmtune.checkpoint import save
from lmtune.errors import LmtuneError
from lmtune.methods import get_method, method_names
from lmtune.objectives import sft_loss
from lmtune.tasks import reference

GRID = [(m, a) for m in CASES for a in ARCHS]
ids = [f"{m}-{a}" for m, a in GRID]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, str]:
    """Each tiny base saved once, so that saved runs name a base `lmtune.load` can find."""
    dirs = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"base-{arch}")
        build_model(arch).save_pretrained(path)
        tokenizer().save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


def test_every_registered_method_is_in_the_suite():
    assert sorted(CASES) == method_names()


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


@pytest.mark.parametrize(("method", "arch"), GRID, ids=ids)
def test_only_the_intended_parameters_train(method, arch):
    model = tuned(method, arch)
    base = {n for n, _ in build_model(arch).named_parameters()}
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    own = {n.replace(".base_layer", "") for n in trainable} & base
    assert own == base_params_that_train(method, build_model(arch))
    added = {n for n, _ in model.model.named_parameters() if n.replace(".base_layer", "") not in base}
    assert added <= trainable  # a new parameter that does not train would be dead weight
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    model.train()
    loss, count, _ = sft_loss(model, sft_batch())
    (loss / count).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad.sign())
    changed = {n for n, p in model.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize(("method", "arch"), GRID, ids=ids)
def test_switched_off_is_the_base_model(method, arch):
    model = tuned(method, arch)
    if not reference.can_switch_off(model):
        with pytest.raises(LmtuneError, match="nothing to switch off"):
            with model.disabled():
                pass
        return
    adapted = logits(model)
    with model.disabled():
        torch.testing.assert_close(logits(model), logits(build_model(arch)), atol=0, rtol=0)
    torch.testing.assert_close(logits(model), adapted, atol=0, rtol=0)
    assert _differs(adapted, logits(build_model(arch)))


@pytest.mark.parametrize(("method", "arch"), GRID, ids=ids)
def test_save_then_load_gives_the_same_logits(method, arch, base_dirs, tmp_path):
    model = tuned(method, arch, base_name=base_dirs[arch])
    save(model, tmp_path / "run", tokenizer())
    loaded, _ = lmtune.load(tmp_path / "run")
    expected = logits(model)
    assert _differs(expected, logits(build_model(arch)))
    torch.testing.assert_close(logits(loaded.eval()), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("method", "arch"), GRID, ids=ids)
def test_merged_equals_unmerged(method, arch):
    model = tuned(method, arch)
    if get_method(method).merge is None:
        with pytest.raises(LmtuneError, match=f"cannot merge '{method}'"):
            model.merge()
        return
    unmerged = logits(model)
    assert _differs(unmerged, logits(build_model(arch)))
    merged = copy.deepcopy(model).merge()
    assert not any(hasattr(m, "disabled") for m in merged.modules())  # a plain transformers model
    torch.testing.assert_close(logits(merged), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("method", "arch"), GRID, ids=ids)
def test_greedy_generation_equals_the_teacher_forced_argmax(method, arch, new=5):
    model = tuned(method, arch)
    ids_, mask = left_padded()
    out = model.generate(ids_, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0, use_cache=True)
    assert out.shape == (2, 7 + new) and torch.equal(out[:, :7], ids_)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded row
    with torch.no_grad():
        forced = model(input_ids=out, attention_mask=full_mask, position_ids=positions).logits
    assert torch.equal(forced[:, 6:-1].argmax(-1), out[:, 7:])
    # Sampling from the top token only is greedy decoding by another path; two samples per prompt repeat the
    # rows, and whatever the method adds to the inputs or the cache must follow them.
    sampled = model.generate(ids_, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                             top_k=1, pad_token_id=0, use_cache=True, num_return_sequences=2)
    assert torch.equal(sampled, out.repeat_interleave(2, dim=0))
