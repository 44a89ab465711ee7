"""Full and partial (freeze) fine-tuning: exactly the chosen parameters train, and whole-model
checkpoints round-trip through lmtune and plain transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_model, logits, trainable
from transformers import AutoModelForCausalLM

import lmtune
from lmtune.checkpoint import save

LAST_BLOCK = {"llama": "model.layers.1.", "qwen2": "model.layers.1.", "mistral": "model.layers.1.",
              "gpt2": "transformer.h.1.", "gpt_neox": "gpt_neox.layers.1."}
LLAMA_NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
LLAMA_BLOCK = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight", *LLAMA_NORMS]
GPT2_BLOCK_BITFIT = ["ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                     "ln_2.weight", "ln_2.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"]





# --- what trains -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_full_trains_every_parameter(arch):
    model = build_model(arch)
    model.requires_grad_(False)  # even what was frozen before
    tuned = lmtune.apply(model, "full")
    assert all(p.requires_grad for p in model.parameters())
    trained, total = tuned.trainable_parameters()
    assert trained == total == sum(p.numel() for p in build_model(arch).parameters())


def test_freeze_last_layer_trains_exactly_the_last_llama_block():
    tuned = lmtune.apply(build_model("llama"), {"name": "freeze", "last_n_layers": 1})
    assert trainable(tuned) == {f"model.layers.1.{name}" for name in LLAMA_BLOCK}


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_last_layer_on_every_arch(arch):
    tuned = lmtune.apply(build_model(arch), {"name": "freeze", "last_n_layers": 1})
    names = [name for name, _ in tuned.model.named_parameters()]
    assert trainable(tuned) == {name for name in names if name.startswith(LAST_BLOCK[arch])}
    tuned = lmtune.apply(build_model(arch), {"name": "freeze", "last_n_layers": 2})
    assert trainable(tuned) == {name for name in names if ".layers." in name or ".h." in name}


def test_freeze_patterns_union_with_last_layers():
    options = {"name": "freeze", "patterns": ["norm", r"^model\.embed_tokens"]}
    tuned = lmtune.apply(build_model("llama"), options)
    norms = {f"model.layers.{i}.{name}" for i in (0, 1) for name in LLAMA_NORMS}
    assert trainable(tuned) == norms | {"model.norm.weight", "model.embed_tokens.weight"}
    options = {"name": "freeze", "last_n_layers": 1, "patterns": [r"model\.norm"]}
    tuned = lmtune.apply(build_model("llama"), options)
    assert trainable(tuned) == {f"model.layers.1.{name}" for name in LLAMA_BLOCK} | {"model.norm.weight"}


def test_bitfit_on_gpt2_trains_only_norms_and_biases():
    tuned = lmtune.apply(build_model("gpt2"), {"name": "freeze", "bitfit": True})
    block = {f"transformer.h.{i}.{name}" for i in (0, 1) for name in GPT2_BLOCK_BITFIT}
    assert trainable(tuned) == block | {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    tuned = lmtune.apply(build_model("gpt2"), {"name": "freeze", "bitfit": True, "last_n_layers": 1})
    assert trainable(tuned) == {f"transformer.h.1.{name}" for name in GPT2_BLOCK_BITFIT}


def test_bitfit_on_llama_trains_only_norms():
    tuned = lmtune.apply(build_model("llama"), {"name": "freeze", "bitfit": True})
    names = [name for name, _ in tuned.model.named_parameters()]
    assert trainable(tuned) == {name for name in names if name.endswith("norm.weight")}


@pytest.mark.parametrize("options, message", [
    ({"patterns": ["no_such_param"]}, "no_such_param"),
    ({"patterns": ["([bad"]}, "patterns"),
    ({"last_n_layers": 0}, "last_n_layers"),
    ({"last_n_layers": 3}, "last_n_layers"),
    ({}, "choose what trains"),
], ids=["no-match", "invalid-regex", "zero-layers", "too-many-layers", "nothing-chosen"])
def test_bad_freeze_options_are_refused(options, message):
    model = build_model("llama")
    with pytest.raises(lmtune.LmtuneError, match=message):
        lmtune.apply(model, {"name": "freeze", **options})
    assert all(p.requires_grad for p in model.parameters())


# --- checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, method", [
    ("llama", "full"), ("gpt2", "full"),
    ("llama", {"name": "freeze", "last_n_layers": 1}), ("gpt2", {"name": "freeze", "bitfit": True}),
], ids=["llama-full", "gpt2-full", "llama-last-layer", "gpt2-bitfit"])
def test_whole_model_round_trip(arch, method, tmp_path, tokenizer):
    tuned = lmtune.apply(build_model(arch), method, base_name=f"tiny-{arch}")
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for p in tuned.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = logits(tuned)
    assert (expected - logits(build_model(arch))).abs().max() > 1e-3
    save(tuned, tmp_path, tokenizer)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    loaded, _ = lmtune.load(tmp_path)
    assert loaded.method.name == tuned.method.name and trainable(loaded) == trainable(tuned)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-5, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)
