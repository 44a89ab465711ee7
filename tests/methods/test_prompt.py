"""Prompt tuning and P-tuning against PEFT (logits both ways), plus padding, generation, the SFT objective,
training, gradient checkpointing, init and bad configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, build_model, trainable
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig
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

import lmtune
from lmtune.checkpoint import save
from lmtune.errors import LmtuneError
from lmtune.objectives import sft_loss

METHODS = {"prompt": {"name": "prompt"}, "p-tuning-mlp": {"name": "p-tuning", "encoder_hidden_size": 16},
           "p-tuning-lstm": {"name": "p-tuning", "encoder": "lstm", "encoder_hidden_size": 8}}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_our_adapter_with_our_logits(arch, method, tmp_path):
    assert_peft_loads_ours(arch, METHODS[method], tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("config", [
    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT),
    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT, encoder_hidden_size=16),
    PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT, encoder_hidden_size=8,
                        encoder_reparameterization_type="LSTM")], ids=["prompt", "p-tuning-mlp", "p-tuning-lstm"])
def test_we_load_a_peft_adapter_with_its_logits(arch, config, tmp_path):
    assert_we_load_peft(arch, config, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "p-tuning-lstm"])
def test_padding_side_does_not_change_logits(arch, method):
    assert_left_padding_is_invisible(arch, METHODS[method])


@pytest.mark.parametrize("method", ["prompt", "p-tuning-mlp"])
def test_sft_objective_keeps_only_real_token_logits(method, tmp_path):
    """sft_loss (bool logits_to_keep through the hook) equals a hand cross-entropy over PEFT's logits."""
    ours = tuned("llama", METHODS[method])
    save(ours, tmp_path)
    peft = PeftModel.from_pretrained(build_model("llama"), tmp_path)
    b = sft_batch()
    total, count, _ = sft_loss(ours, b)
    with torch.no_grad():
        logits = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, NVT:]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
    assert int(count) == int((b["labels"][:, 1:] != -100).sum())
    assert_close(total.detach(), expected)
    # `labels=` in forward is the mean of the same sum
    assert_close(ours(**b).loss.detach(), expected / count)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_moves_only_the_prompt_and_lowers_the_loss(method):
    model = tuned("llama", METHODS[method])
    assert trainable(model) and all(n.startswith("prompt_encoder.") for n in trainable(model))
    frozen = {n: p.clone() for n, p in model.model.named_parameters() if not p.requires_grad}
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
    assert all(torch.equal(p, frozen[n]) for n, p in model.model.named_parameters() if n in frozen)


@pytest.mark.parametrize("method", ["prompt", "p-tuning-mlp"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for checkpointing in (False, True):
        model = tuned("llama", METHODS[method])
        if checkpointing:
            model.model.gradient_checkpointing_enable()
        model.train()
        model(**sft_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad)


def test_round_trip_through_our_own_checkpoint_keeps_the_logits(tmp_path, model_dir, tokenizer):
    model, _ = lmtune.load_model(model_dir)
    torch.manual_seed(3)
    ours = lmtune.apply(model, {**METHODS["p-tuning-lstm"], "num_virtual_tokens": NVT}, base_name=model_dir)
    save(ours, tmp_path / "run", tokenizer)
    loaded, _ = lmtune.load(tmp_path / "run")
    ids, mask = batch()
    assert_close(real_logits(loaded, ids, mask), real_logits(ours, ids, mask))
    assert trainable(loaded) == {"prompt_encoder.embedding.weight"}  # PEFT's file keeps only the prompt


def test_text_init_copies_the_word_embeddings_of_the_text(tokenizer):
    model = build_model("llama")
    words = model.get_input_embeddings().weight.detach().clone()
    ours = lmtune.apply(model, {"name": "prompt", "num_virtual_tokens": 5, "init": "text", "init_text": "red blue"},
                        tokenizer=tokenizer)
    ids = tokenizer("red blue")["input_ids"]
    expected = words[torch.tensor((ids * 5)[:5])]
    assert_close(ours.model.prompt_encoder().detach(), expected)


def test_text_init_finds_the_tokenizer_of_a_model_directory(model_dir, tokenizer):
    model, _ = lmtune.load_model(model_dir)
    ours = lmtune.apply(model, {"name": "prompt", "num_virtual_tokens": 2, "init": "text", "init_text": "Paris"})
    ids = tokenizer("Paris")["input_ids"]
    assert_close(ours.model.prompt_encoder().detach(), model.get_input_embeddings().weight[(ids * 2)[:2]].detach())


def test_vocab_init_rows_are_vocabulary_embeddings():
    model = build_model("llama")
    words = model.get_input_embeddings().weight.detach().clone()
    rows = lmtune.apply(model, {"name": "prompt", "num_virtual_tokens": 4, "init": "vocab"}).model.prompt_encoder()
    assert all(((words - row.detach()).abs().sum(-1) == 0).any() for row in rows)


@pytest.mark.parametrize("method, message", [
    ({"name": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"name": "p-tuning", "num_virtual_tokens": 128}, "positions"),
    ({"name": "prompt", "init": "text"}, "init_text"),
])
def test_bad_configs_are_one_line_errors(method, message):
    with pytest.raises(LmtuneError, match=message) as err:
        lmtune.apply(build_model("llama"), method)
    assert "\n" not in str(err.value)


def test_a_sequence_past_the_position_limit_is_refused():
    model = tuned("gpt2", {"name": "prompt"})
    ids = torch.randint(3, 300, (1, 127))
    with pytest.raises(LmtuneError, match="exceed the model's 128 positions"):
        model(input_ids=ids)


@pytest.mark.parametrize("method", ["prompt", "p-tuning", "prefix", "p-tuning-v2"])
def test_lmtune_train_runs_saves_and_generates(method, tmp_path, model_dir):
    """The whole path: `lmtune train` (the objective's bool logits_to_keep), the saved run, `lmtune generate`."""
    import json

    from lmtune.config import load_config
    from lmtune.inference import generate
    from lmtune.train import run

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Colour {i}?", "completion": "red"}) + "\n" for i in range(8)))
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                             "train.device=cpu", f"method={method}", f"method.num_virtual_tokens={NVT}",
                             "train.steps=2", "train.lr=0.1"])
    summary = run(cfg)
    assert summary["trainable_params"] > 0
    loaded, tokenizer = lmtune.load(tmp_path / "run")
    assert loaded.method.name == method
    assert isinstance(generate(loaded, tokenizer, "Colour 9?", max_new_tokens=3), str)
