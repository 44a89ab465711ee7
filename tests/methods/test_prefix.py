"""Prefix tuning and P-tuning v2 against PEFT (logits both ways, GQA models included), plus padding,
generation, the SFT objective, training, gradient checkpointing and bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, build_model, trainable
from peft import PeftModel, PrefixTuningConfig
from prompt_family import (
    NVT,
    assert_close,
    assert_left_padding_is_invisible,
    assert_peft_loads_ours,
    assert_we_load_peft,
    batch,
    real_logits,
    sft_batch,
    tuned,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3NextConfig

import lmtune
from lmtune.checkpoint import ADAPTER_WEIGHTS, save
from lmtune.errors import LmtuneError
from lmtune.methods import get_method
from lmtune.objectives import sft_loss

METHODS = {"prefix": {"name": "prefix", "encoder_hidden_size": 16}, "p-tuning-v2": {"name": "p-tuning-v2"}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_our_adapter_with_our_logits(arch, method, tmp_path):
    assert_peft_loads_ours(arch, METHODS[method], tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # llama and qwen2 are GQA (4 heads, 2 KV heads)
@pytest.mark.parametrize("projection", [True, False], ids=["prefix", "p-tuning-v2"])
def test_we_load_a_peft_adapter_with_its_logits(arch, projection, tmp_path):
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT, prefix_projection=projection,
                                encoder_hidden_size=16)
    assert_we_load_peft(arch, config, tmp_path)


def test_prefix_is_sized_by_key_value_heads(tmp_path):
    """GQA: a tiny llama (hidden 32, 4 heads, 2 KV heads of 8) stores 2 layers x (K, V) x 2 x 8 = 64 per token."""
    save(tuned("llama", METHODS["p-tuning-v2"]), tmp_path)
    assert load_file(tmp_path / ADAPTER_WEIGHTS)["prompt_embeddings"].shape == (NVT, 64)


def test_a_peft_prefix_file_loads_as_the_method_its_prefix_projection_names(tmp_path, model_dir):
    for method, options in METHODS.items():
        ours = tuned("llama", options)  # the same tiny llama as model_dir
        save(ours, tmp_path / method)
        (tmp_path / method / "lmtune.json").unlink()  # read it as a plain PEFT adapter
        loaded, _ = lmtune.load(tmp_path / method, base=model_dir)
        assert loaded.method.name == method
        ids, mask = batch()
        assert_close(real_logits(loaded, ids, mask), real_logits(ours, ids, mask))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_padding_side_does_not_change_logits(arch, method):
    assert_left_padding_is_invisible(arch, METHODS[method])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_default_init_is_the_base_model_reading_real_tokens_first(arch, method):
    """Li & Liang's init from real words' activations: before training the prefix holds the base model's own
    keys/values of `init_ids` (for prefix tuning, as the MLP's output), so the tuned model's logits on x are the
    base model's on [init_ids; x]."""
    model = tuned(arch, METHODS[method])
    first = model.model.prompt_encoder.init_ids
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = build_model(arch)(input_ids=torch.cat([first[None], ids], dim=1)).logits[:, NVT:]
        got = model(input_ids=ids).logits
    assert_close(got, expected, atol=1e-4)


def test_sft_objective_equals_a_hand_loss_over_peft_logits(tmp_path):
    ours = tuned("qwen2", METHODS["prefix"])
    save(ours, tmp_path)
    peft = PeftModel.from_pretrained(build_model("qwen2"), tmp_path)
    b = sft_batch()
    total, count, _ = sft_loss(ours, b)
    with torch.no_grad():
        logits = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
    assert_close(total.detach(), expected)
    assert_close(ours(**b).loss.detach(), expected / count)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_moves_only_the_prefix_and_lowers_the_loss(method):
    model = tuned("llama", METHODS[method])
    assert trainable(model) and all(n.startswith("prompt_encoder.") for n in trainable(model))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    b, losses = sft_batch(), []
    model.train()
    for _ in range(20):
        loss = model(**b).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05


def test_the_adapter_file_is_the_mlp_output_of_the_trained_encoder(tmp_path):
    """The resumable state keeps the MLP (registered, trainable); the PEFT file is derived from it at save time."""
    model = tuned("llama", METHODS["prefix"])
    assert {"prompt_encoder.head.0.weight", "prompt_encoder.head.2.weight"} <= trainable(model)
    with torch.no_grad():
        model.model.prompt_encoder.head[2].bias.add_(1.0)
    save(model, tmp_path)
    with torch.no_grad():
        expected = model.model.prompt_encoder.head(model.model.prompt_encoder.embedding.weight)
    assert_close(load_file(tmp_path / ADAPTER_WEIGHTS)["prompt_embeddings"], expected)


def test_gradient_checkpointing_is_refused_with_one_line():
    assert get_method("prefix").gradient_checkpointing_refusal
    model = tuned("llama", METHODS["prefix"])
    model.model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(LmtuneError, match="gradient checkpointing") as err:
        model(**sft_batch())
    assert "\n" not in str(err.value)
    model.eval()
    ids, mask = batch()
    real_logits(model, ids, mask)  # inference does not recompute anything: allowed


@pytest.mark.parametrize("method, message", [
    ({"name": "prefix", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"name": "p-tuning-v2", "num_virtual_tokens": 200}, "positions"),
])
def test_bad_configs_are_one_line_errors(method, message):
    with pytest.raises(LmtuneError, match=message) as err:
        lmtune.apply(build_model("llama"), method)
    assert "\n" not in str(err.value)


def test_an_attention_cache_without_key_value_layers_is_refused():
    config = Qwen3NextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LmtuneError, match="cannot take a key/value prefix"):
        lmtune.apply(model, "prefix")
    assert not any(p.requires_grad is False for p in model.parameters())  # refused before touching the model
