"""LoRA against PEFT as the oracle, on every test architecture (GPT-2's Conv1D included).

Adapters start non-identity (`init: random`, PEFT's `init_lora_weights=False`) wherever a no-op
adapter would let a comparison pass vacuously.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ARCHS, build_model
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

import lmtune
from lmtune.checkpoint import save
from lmtune.methods.lora import LoraLinear

ATOL = 1e-5
PEFT_PREFIX = "base_model.model."
RANDOM = {"name": "lora", "r": 4, "alpha": 8, "init": "random"}
# Every Linear / Conv1D of block 1 on all five architectures (q_proj.., c_attn, c_proj, query_key_value).
LAYER1_REGEX = r".*\.1\..*(_proj|c_attn|query_key_value)"


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 7 tokens; the second is right-padded by 2 (masked out, no loss)."""
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask, _ = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3, "the adapter changed nothing: the comparison would be vacuous"


def lmtune_lora(arch: str, **options) -> lmtune.TunedModel:
    return lmtune.apply(build_model(arch), {**RANDOM, **options}, base_name=f"tiny-{arch}")


def peft_lora(arch: str, **options) -> PeftModel:
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **options}
    return get_peft_model(build_model(arch), PeftLoraConfig(**cfg))


def peft_load(arch: str, path) -> PeftModel:
    """PEFT loads our checkpoint onto a fresh base; every adapter key must fit, none left over."""
    model = PeftModel.from_pretrained(build_model(arch), path)
    keys = model.load_adapter(path, adapter_name="check")
    assert not keys.missing_keys and not keys.unexpected_keys, keys
    model.delete_adapter("check")
    return model.eval()


def wrapped(tuned: lmtune.TunedModel) -> set[str]:
    return {name for name, m in tuned.model.named_modules() if isinstance(m, LoraLinear)}


def peft_wrapped(model: PeftModel) -> set[str]:
    return {name.removeprefix(PEFT_PREFIX) for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def copy_peft_weights(tuned: lmtune.TunedModel, model: PeftModel) -> None:
    """Give `tuned` exactly PEFT's adapter weights (PEFT's saved key = ours with PEFT's prefix)."""
    params = dict(tuned.model.named_parameters())
    with torch.no_grad():
        for key, value in get_peft_model_state_dict(model).items():
            params[key.removeprefix(PEFT_PREFIX)].copy_(value)


# --- checkpoints both ways -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_lmtune_adapter_loads_in_peft(arch, tmp_path):
    tuned = lmtune_lora(arch)
    save(tuned, tmp_path)
    model = peft_load(arch, tmp_path)
    assert peft_wrapped(model) == wrapped(tuned)
    assert_close(logits(model), logits(tuned))
    assert_differs(logits(tuned), logits(build_model(arch)))


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_in_lmtune(arch, tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    build_model(arch).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = peft_lora(arch, target_modules="all-linear").eval()
    model.save_pretrained(tmp_path / "adapter")
    tuned, _ = lmtune.load(tmp_path / "adapter", base=str(base_dir))
    assert (tuned.method_config.r, tuned.method_config.alpha, tuned.method_config.init) == (4, 8, "random")
    assert wrapped(tuned) == peft_wrapped(model)
    assert_close(logits(tuned), logits(model))
    assert_differs(logits(tuned), logits(build_model(arch)))


# --- training signal -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_peft(arch):
    model = peft_lora(arch, target_modules="all-linear")
    tuned = lmtune_lora(arch, target_modules="all-linear")
    copy_peft_weights(tuned, model)
    ids, mask, labels = batch()
    ours = tuned(ids, mask, labels).loss
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' mean shifted CE
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    peft_grads = {name.removeprefix(PEFT_PREFIX).replace(".default.", "."): p.grad
                  for name, p in model.named_parameters() if p.requires_grad}
    our_grads = {name: p.grad for name, p in tuned.model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == peft_grads.keys()
    for name, grad in our_grads.items():
        expected = peft_grads[name]
        assert grad is not None and expected.abs().max() > 0, name
        assert_close(grad, expected, atol=ATOL * max(1.0, expected.abs().max().item()))


# --- merging ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_unmerged_and_peft(arch, tmp_path):
    tuned = lmtune_lora(arch, target_modules="all-linear")
    unmerged = logits(tuned)
    save(tuned, tmp_path)
    peft_merged = peft_load(arch, tmp_path).merge_and_unload()
    merged_model = tuned.merge()
    assert isinstance(merged_model, PreTrainedModel)
    assert not any(isinstance(m, LoraLinear) for m in merged_model.modules())
    assert merged_model.state_dict().keys() == build_model(arch).state_dict().keys()
    merged = logits(merged_model)
    assert_close(merged, unmerged)
    assert_close(merged, logits(peft_merged))
    assert_differs(merged, logits(build_model(arch)))


# --- what trains, and where ------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [None, "all-linear", LAYER1_REGEX],
                         ids=["default", "all-linear", "regex"])
@pytest.mark.parametrize("arch", ARCHS)
def test_targets_and_trainable_count_match_peft(arch, targets):
    tuned = lmtune.apply(build_model(arch), {"name": "lora", "r": 4, "target_modules": targets})
    model = get_peft_model(build_model(arch), PeftLoraConfig(r=4, target_modules=targets))
    assert wrapped(tuned) and wrapped(tuned) == peft_wrapped(model)
    trainable = [name for name, p in tuned.model.named_parameters() if p.requires_grad]
    assert all(re.search(r"\.lora_[AB]\.weight$", name) for name in trainable)
    assert len(trainable) == 2 * len(wrapped(tuned))
    assert tuned.trainable_parameters() == model.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rslora_scaling_matches_peft(arch, tmp_path):
    tuned = lmtune_lora(arch, use_rslora=True)
    assert {m.scaling for m in tuned.model.modules() if isinstance(m, LoraLinear)} == {8 / 4 ** 0.5}
    save(tuned, tmp_path)
    model = peft_load(arch, tmp_path)
    assert model.peft_config["default"].use_rslora
    assert_close(logits(model), logits(tuned))
    plain = lmtune_lora(arch)
    plain.model.load_state_dict(tuned.model.state_dict())  # same weights, scaled by alpha / r
    assert_differs(logits(plain), logits(tuned))


# --- initialisation --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_kaiming_init_is_a_noop_with_uniform_a(arch):
    tuned = lmtune.apply(build_model(arch), {"name": "lora", "r": 8, "target_modules": "all-linear"})
    for module in tuned.model.modules():
        if isinstance(module, LoraLinear):
            a, bound = module.lora_A.weight, module.lora_A.in_features ** -0.5  # kaiming_uniform(a=sqrt(5))
            assert torch.all(module.lora_B.weight == 0)
            assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert_close(logits(tuned), logits(build_model(arch)), atol=0)


def test_gaussian_init_has_std_one_over_r():
    r = 8
    tuned = lmtune.apply(build_model("llama"), {"name": "lora", "r": r, "init": "gaussian",
                                                "target_modules": "all-linear"})
    modules = [m for m in tuned.model.modules() if isinstance(m, LoraLinear)]
    a = torch.cat([m.lora_A.weight.flatten() for m in modules])  # ~4000 samples: std known to ~2%
    assert abs(a.std().item() - 1 / r) < 0.1 / r and abs(a.mean().item()) < 0.1 / r
    assert all(torch.all(m.lora_B.weight == 0) for m in modules)
    assert_close(logits(tuned), logits(build_model("llama")), atol=0)


# --- errors ----------------------------------------------------------------------------------------

def test_targets_matching_nothing_name_the_available_modules():
    with pytest.raises(lmtune.LmtuneError, match="nope") as err:
        lmtune.apply(build_model("llama"), {"name": "lora", "target_modules": ["nope"]})
    assert all(name in str(err.value) for name in ["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("r", [0, -1])
def test_non_positive_rank_is_rejected(r):
    with pytest.raises(lmtune.LmtuneError, match="r"):
        lmtune.apply(build_model("llama"), {"name": "lora", "r": r})


@pytest.mark.parametrize("targets", [r".*\.layers\.1", "([bad"], ids=["non-linear", "invalid-regex"])
def test_bad_targets_are_refused_and_leave_the_model_untouched(targets):
    model = build_model("llama")
    with pytest.raises(lmtune.LmtuneError):
        lmtune.apply(model, {"name": "lora", "target_modules": targets})
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
