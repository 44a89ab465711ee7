"""IA3 against PEFT as the oracle, on every test architecture (GPT-2's Conv1D included).

Vectors start random (`init: random`, PEFT's `init_ia3_weights=False`) wherever ones would let a
comparison pass vacuously.
"""

from __future__ import annotations

import json

import pytest
import torch
from _cli import CHAT, in_process_cli
from conftest import ARCHS, build_model, logits, trainable
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.ia3 import IA3Layer
from transformers import AutoModelForCausalLM, PreTrainedModel

import lmtune
from lmtune.checkpoint import save
from lmtune.inference import generate
from lmtune.methods.ia3 import IA3Linear

ATOL = 1e-5
PEFT_PREFIX = "base_model.model."
RANDOM = {"name": "ia3", "init": "random"}
ALL_LINEAR = {  # every Linear / Conv1D, with the FFN output projection as the feed-forward module
    "llama": ("all-linear", ["down_proj"]), "qwen2": ("all-linear", ["down_proj"]),
    "mistral": ("all-linear", ["down_proj"]), "gpt2": ("all-linear", ["mlp.c_proj"]),
    "gpt_neox": ("all-linear", ["dense_4h_to_h"]),
}


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 7 tokens; the second is right-padded by 2 (masked out, no loss)."""
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3, "the vectors changed nothing: the comparison would be vacuous"


def lmtune_ia3(arch: str, **options) -> lmtune.TunedModel:
    return lmtune.apply(build_model(arch), {**RANDOM, **options}, base_name=f"tiny-{arch}")


def peft_ia3(arch: str, **options) -> PeftModel:
    torch.manual_seed(1)  # PEFT's random vectors differ from ours; tests copy or save them across
    return get_peft_model(build_model(arch), PeftIA3Config(init_ia3_weights=False, **options))


def peft_load(arch: str, path) -> PeftModel:
    """PEFT loads our checkpoint onto a fresh base; every adapter key must fit, none left over."""
    model = PeftModel.from_pretrained(build_model(arch), path)
    keys = model.load_adapter(path, adapter_name="check")
    assert not keys.missing_keys and not keys.unexpected_keys, keys
    model.delete_adapter("check")
    return model.eval()


def wrapped(tuned: lmtune.TunedModel) -> dict[str, bool]:
    """Wrapped module path -> is it a feed-forward (input-scaling) module."""
    return {name: m.is_feedforward for name, m in tuned.model.named_modules() if isinstance(m, IA3Linear)}


def peft_wrapped(model: PeftModel) -> dict[str, bool]:
    return {name.removeprefix(PEFT_PREFIX): m.is_feedforward for name, m in model.named_modules()
            if isinstance(m, IA3Layer)}


def copy_peft_weights(tuned: lmtune.TunedModel, model: PeftModel) -> None:
    params = dict(tuned.model.named_parameters())
    with torch.no_grad():
        for key, value in get_peft_model_state_dict(model).items():
            params[key.removeprefix(PEFT_PREFIX)].copy_(value)


def all_linear(arch: str) -> dict:
    targets, feedforward = ALL_LINEAR[arch]
    return {"target_modules": targets, "feedforward_modules": feedforward}


# --- checkpoints both ways -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_lmtune_ia3_loads_in_peft(arch, tmp_path):
    tuned = lmtune_ia3(arch)
    save(tuned, tmp_path)
    model = peft_load(arch, tmp_path)
    assert peft_wrapped(model) == wrapped(tuned)
    assert_close(logits(model), logits(tuned))
    assert_differs(logits(tuned), logits(build_model(arch)))


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_ia3_loads_in_lmtune(arch, tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    build_model(arch).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = peft_ia3(arch, **all_linear(arch)).eval()
    model.save_pretrained(tmp_path / "adapter")
    tuned, _ = lmtune.load(tmp_path / "adapter", base=str(base_dir))
    assert tuned.method_config.init == "random"
    assert wrapped(tuned) == peft_wrapped(model) and any(wrapped(tuned).values())
    assert_close(logits(tuned), logits(model))
    assert_differs(logits(tuned), logits(build_model(arch)))


# --- training signal -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_match_peft(arch):
    model = peft_ia3(arch, **all_linear(arch))
    tuned = lmtune_ia3(arch, **all_linear(arch))
    copy_peft_weights(tuned, model)
    ids, mask, labels = batch()
    ours = tuned(ids, mask, labels).loss
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    peft_grads = {name.removeprefix(PEFT_PREFIX).removesuffix(".default"): p.grad
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
    tuned = lmtune_ia3(arch, **all_linear(arch))
    unmerged = logits(tuned)
    save(tuned, tmp_path)
    peft_merged = peft_load(arch, tmp_path).merge_and_unload()
    merged_model = tuned.merge()
    assert isinstance(merged_model, PreTrainedModel)
    assert not any(isinstance(m, IA3Linear) for m in merged_model.modules())
    assert merged_model.state_dict().keys() == build_model(arch).state_dict().keys()
    merged = logits(merged_model)
    assert_close(merged, unmerged)
    assert_close(merged, logits(peft_merged))
    assert_differs(merged, logits(build_model(arch)))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])  # biases on scaled outputs; Conv1D
def test_merge_in_place_then_unmerge_restores_the_base(arch):
    tuned = lmtune_ia3(arch, **all_linear(arch))
    adapted = logits(tuned)
    modules = [m for m in tuned.model.modules() if isinstance(m, IA3Linear)]
    for m in modules:
        m.merge()
    assert_close(logits(tuned), adapted)
    with tuned.disabled():  # asking for the base model takes the vectors back out
        assert_close(logits(tuned), logits(build_model(arch)))
    assert_close(logits(tuned), adapted)
    base = build_model(arch).state_dict()
    for name, value in tuned.model.state_dict().items():
        if ".ia3_l" not in name:
            assert_close(value, base[name.replace(".base_layer", "")], atol=1e-6)


# --- what trains, and where ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_feedforward_and_count_match_peft(arch):
    tuned = lmtune.apply(build_model(arch), "ia3")
    model = get_peft_model(build_model(arch), PeftIA3Config())
    assert wrapped(tuned) == peft_wrapped(model)
    assert any(wrapped(tuned).values()) and not all(wrapped(tuned).values())
    assert all(name.endswith(".ia3_l") for name in trainable(tuned))
    assert tuned.trainable_parameters() == model.get_nb_trainable_parameters()
    assert_close(logits(tuned), logits(build_model(arch)), atol=0)  # ones: the base model exactly


def test_vector_shapes_follow_peft():
    tuned = lmtune.apply(build_model("llama"), "ia3")
    shapes = {name: tuple(p.shape) for name, p in tuned.model.named_parameters() if p.requires_grad}
    # k/v: (out, 1) with GQA's 2 kv heads x 8; down_proj scales its 64 inputs.
    assert shapes["model.layers.0.self_attn.k_proj.ia3_l"] == (16, 1)
    assert shapes["model.layers.0.self_attn.v_proj.ia3_l"] == (16, 1)
    assert shapes["model.layers.0.mlp.down_proj.ia3_l"] == (1, 64)


@pytest.mark.parametrize("feedforward", [r".*mlp\.down_proj", []], ids=["regex", "none"])
def test_feedforward_options_match_peft(feedforward):
    options = {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": feedforward}
    tuned = lmtune.apply(build_model("llama"), {"name": "ia3", **options})
    assert wrapped(tuned) == peft_wrapped(get_peft_model(build_model("llama"), PeftIA3Config(**options)))


# --- errors ----------------------------------------------------------------------------------------

def test_feedforward_outside_the_targets_is_refused():
    with pytest.raises(lmtune.LmtuneError, match="feedforward_modules.*must also be in target_modules"):
        lmtune.apply(build_model("llama"), {"name": "ia3", "target_modules": ["k_proj"],
                                            "feedforward_modules": ["down_proj"]})


def test_unknown_architecture_names_the_options_to_set():
    model = build_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(lmtune.LmtuneError, match="method.target_modules"):
        lmtune.apply(model, "ia3")
    with pytest.raises(lmtune.LmtuneError, match="method.feedforward_modules"):
        lmtune.apply(model, {"name": "ia3", "target_modules": ["k_proj", "down_proj"]})
    assert all(p.requires_grad for p in model.parameters())
    tuned = lmtune.apply(model, {"name": "ia3", "target_modules": ["k_proj", "down_proj"],
                                 "feedforward_modules": ["down_proj"]})
    assert sum(wrapped(tuned).values()) == 2


# --- through the CLI (in process, as tests/test_cli.py does) ----------------------------------------

@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    yield from in_process_cli(capfd, monkeypatch, tmp_path)


def test_trains_from_yaml_generates_and_merges(cli, tmp_path, model_dir):
    (tmp_path / "chat.jsonl").write_text(json.dumps(CHAT) + "\n")
    (tmp_path / "run.yaml").write_text(f"model: {model_dir}\nmethod: ia3\n"
                                       "data: {train: chat.jsonl}\ntrain: {steps: 3, batch_size: 1, lr: 0.05}\n")
    code, _, err = cli("train", "run.yaml", "output_dir=run")
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    code, out, err = cli("generate", "run", "--prompt", "What is two plus two?", "--max-new-tokens", "4")
    assert (code, out) == (0, generate(*lmtune.load(tmp_path / "run"), "What is two plus two?", 4) + "\n"), err
    code, _, err = cli("merge", "run", "--out", "merged")
    assert code == 0, err
    tuned, _ = lmtune.load(tmp_path / "run")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_close(logits(merged), logits(tuned))
    assert_differs(logits(merged), logits(AutoModelForCausalLM.from_pretrained(model_dir)))
