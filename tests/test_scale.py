"""Scale features on a tiny llama: 4-bit / 8-bit base weights (QLoRA), precision, gradient checkpointing,
and two-process data parallel training equal to one process with the same global batch."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, build_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import lmtune
from lmtune.config import load_config
from lmtune.errors import LmtuneError
from lmtune.models import load_weights
from lmtune.train import run

pytest.importorskip("bitsandbytes")
from bitsandbytes.nn import Linear4bit, Linear8bitLt  # noqa: E402

TEXTS = ["The capital of France is Paris.", "What is two plus two? It is four.", "Hello there, how are you today?",
         "I am a small language model made for tests.", "Name three colors: red, green and blue.", "It is four.",
         "red, green and blue", "Paris is the capital."]


def tiny_llama_dir(path, head_dim: int) -> str:
    """A tiny llama 64 wide; `head_dim` 32 gives k/v projections bitsandbytes' 4-bit CPU kernel can tile
    (outputs a multiple of 32, inputs of 64), 16 gives 16-output k/v projections it cannot."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=64 // head_dim, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory) -> str:
    return tiny_llama_dir(tmp_path_factory.mktemp("tileable-llama"), head_dim=32)


def data_file(tmp_path) -> str:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def overrides(tmp_path, model_dir: str, name: str, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"data.train={data_file(tmp_path)}", f"output_dir={tmp_path / name}",
            "train.device=cpu", "train.lr=1e-2", "train.schedule=constant", "method.init=random", *extra]


def ids() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    return x, mask


def test_qlora_matches_peft_on_the_same_4bit_base(quant_dir):
    """Oracle: PEFT's LoRA on bitsandbytes' Linear4bit, same 4-bit weights, same adapter weights."""
    from peft import LoraConfig, get_peft_model

    base = load_weights(quant_dir, quantization="4bit", double_quant=True)
    assert all(isinstance(m, Linear4bit) for n, m in base.named_modules() if n.endswith("_proj"))
    peft = get_peft_model(load_weights(quant_dir, quantization="4bit", double_quant=True),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False))
    ours = lmtune.apply(base, {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    with torch.no_grad():
        state = {k.removeprefix("base_model.model.").replace(".default", ""): v
                 for k, v in peft.state_dict().items() if "lora_" in k}
        for name, p in ours.model.named_parameters():
            if p.requires_grad:
                p.copy_(state[name])
    x, mask = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x, attention_mask=mask).logits,
                                   peft(input_ids=x, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


# The oracle: the same LoRA run on a float base. 4-bit computes with the dequantized weights exactly (the float
# base holds those); LLM.int8 also rounds the activations (fp16, int8 rows), so it is held to the original base.
@pytest.mark.parametrize("bits, layer, oracle, tolerance", [("4bit", Linear4bit, "dequantized", 0.01),
                                                            ("8bit", Linear8bitLt, "original", 0.05)])
def test_quantized_lora_trains_saves_reloads_and_generates(tmp_path, quant_dir, bits, layer, oracle, tolerance):
    def losses(name: str, model: str, quantization: str) -> list[float]:
        run(load_config(None, overrides(tmp_path, model, name, f"model.quantization={quantization}",
                                        "train.steps=15", "train.lr=3e-2", "method.target_modules=all-linear")))
        return [json.loads(r)["loss"] for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    float_base = quant_dir
    if oracle == "dequantized":
        float_base = str(tmp_path / "dequantized")
        load_weights(quant_dir, quantization=bits).dequantize().save_pretrained(float_base)
        build_tokenizer().save_pretrained(float_base)
    quantized, full = losses("q", quant_dir, bits), losses("fp32", float_base, "none")
    assert quantized[-1] < quantized[0] - 0.1  # it learns on top of the quantized weights ...
    assert max(abs(a - b) for a, b in zip(quantized, full, strict=True)) < tolerance  # ... as a float base does
    info = json.loads((tmp_path / "q" / "lmtune.json").read_text())
    assert info["base_quantization"]["quantization"] == bits
    tuned, tokenizer = lmtune.load(tmp_path / "q")
    assert isinstance(tuned.model.model.layers[0].mlp.down_proj.base_layer, layer)
    out = tuned.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1


def test_merge_of_a_qlora_run_dequantizes_and_keeps_the_logits(tmp_path, quant_dir, caplog):
    run(load_config(None, overrides(tmp_path, quant_dir, "q", "model.quantization=4bit", "train.steps=3")))
    tuned, _ = lmtune.load(tmp_path / "q")
    x, mask = ids()
    with torch.no_grad():
        before = tuned(input_ids=x, attention_mask=mask).logits
    from lmtune.checkpoint import merge_to

    with caplog.at_level("WARNING", logger="lmtune"):
        merge_to(tmp_path / "q", tmp_path / "merged")
    assert "dequantizing the 4-bit NF4 base weights" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not getattr(merged.config, "quantization_config", None)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x, attention_mask=mask).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [32, 16])
def test_4bit_eval_computes_what_training_computes_on_every_shape(tmp_path, head_dim):
    """bitsandbytes' fused CPU kernel (no-grad, eval) rounded the block scales to bf16 for good and failed on
    16-output k/v projections; the oracle is a float model holding exactly the dequantized weights."""
    path = tiny_llama_dir(tmp_path / f"llama-{head_dim}", head_dim=head_dim)
    quantized = load_weights(path, quantization="4bit", double_quant=True)
    assert all(isinstance(m, Linear4bit) for n, m in quantized.named_modules() if n.endswith("_proj"))
    dequantized = load_weights(path, quantization="4bit", double_quant=True).dequantize()
    x, mask = ids()
    with torch.no_grad():
        expected = dequantized(input_ids=x, attention_mask=mask).logits
        torch.testing.assert_close(quantized(input_ids=x, attention_mask=mask).logits, expected, atol=0, rtol=0)
        one = quantized(input_ids=x[:1, :1]).logits  # one token: bitsandbytes' gemv path
        torch.testing.assert_close(one, dequantized(input_ids=x[:1, :1]).logits, atol=0, rtol=0)
    quantized.train()  # after an evaluation, training still sees the weights it started from
    torch.testing.assert_close(quantized(input_ids=x, attention_mask=mask).logits, expected, atol=0, rtol=0)


def test_qlora_on_the_default_model_trains_saves_reloads_and_merges(tmp_path):
    """The real shapes (576 wide, 192-output k/v, 1536 MLP): trains, reloads 4-bit, merges to the same logits."""
    summary = run(load_config(None, [f"data.train={data_file(tmp_path)}", f"output_dir={tmp_path / 'q'}",
                                     "train.device=cpu", "model.quantization=4bit", "train.steps=2",
                                     "train.batch_size=2", "train.lr=1e-3", "train.warmup_steps=0",
                                     "data.max_length=24", "method.target_modules=all-linear"]))
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    tuned, tokenizer = lmtune.load(tmp_path / "q")
    projections = [m for n, m in tuned.model.named_modules() if n.endswith("_proj.base_layer")]
    assert len(projections) == 30 * 7 and all(isinstance(m, Linear4bit) for m in projections)
    x = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        before = tuned(**x).logits
    from lmtune.checkpoint import merge_to

    merge_to(tmp_path / "q", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, before, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("extra, message", [
    (["method=full", "model.quantization=4bit"], "method 'full' trains the base weights"),
    (["train.precision=fp16-mixed"], "fp16-mixed needs a CUDA GPU"),
    (["train.precision=bf16-mixed", "model.dtype=bfloat16"], "keeps fp32 master weights"),
    (["method=prefix", "train.gradient_checkpointing=true"], "cannot train with gradient checkpointing"),
])
def test_unsupported_combinations_are_refused(tmp_path, model_dir, extra, message):
    with pytest.raises(LmtuneError, match=message):
        run(load_config(None, overrides(tmp_path, model_dir, "bad", "method=lora", *extra)[:-1] + extra))
    assert not (tmp_path / "bad").exists()


def test_bf16_mixed_autocasts_the_matmuls_and_keeps_fp32_master_weights(tmp_path, model_dir, monkeypatch):
    seen = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        y = original(self, x)
        seen.append((self.weight.dtype, y.dtype))
        return y

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    summary = run(load_config(None, overrides(tmp_path, model_dir, "mixed", "train.precision=bf16-mixed",
                                              "train.steps=2")))
    assert torch.isfinite(torch.tensor(summary["loss"]))
    assert seen and all(w == torch.float32 and y == torch.bfloat16 for w, y in seen)
    adapter = load_file(tmp_path / "mixed" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())


def test_pure_bf16_loads_bf16_weights_and_keeps_fp32_adapters(tmp_path, model_dir):
    run(load_config(None, overrides(tmp_path, model_dir, "bf16", "train.precision=bf16", "train.steps=2")))
    tuned, _ = lmtune.load(tmp_path / "bf16", dtype="bfloat16")
    assert tuned.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert tuned.model.model.layers[0].self_attn.q_proj.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(model_dir, method):
    from lmtune.tuned import enable_gradient_checkpointing

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        tuned = lmtune.apply(load_weights(model_dir), {"name": method, **({"init": "random"} if method == "lora" else {})})
        if checkpointing:
            enable_gradient_checkpointing(tuned)
            assert tuned.model.is_gradient_checkpointing
        tuned.train()
        x, mask = ids()
        tuned(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        return {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, model_dir):
    """DDP over gloo: 2 processes x batch 2 == 1 process x batch 4, adapter weights after 3 steps."""
    common = overrides(tmp_path, model_dir, "x", "train.steps=3", "train.eval_every=1", "data.eval_split=0.25")[:2] + [
        "train.device=cpu", "train.lr=1e-2", "train.schedule=constant", "method.init=random",
        "method.target_modules=all-linear", "train.steps=3", "train.max_grad_norm=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", "-m", "lmtune.cli", "train", *common, "train.batch_size=2",
                    f"output_dir={tmp_path / 'ddp'}"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "lmtune.cli", "train", *common, "train.batch_size=4",
                    f"output_dir={tmp_path / 'single'}"], check=True, env=env, capture_output=True, timeout=300)
    ddp, single = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ddp", "single"))
    assert ddp.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-6, rtol=1e-5, msg=key)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["effective_batch"] == 4
    rows = [json.loads(r) for r in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_rows = [json.loads(r) for r in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 5) for r in rows if "loss" in r] == [round(r["loss"], 5) for r in single_rows
                                                                   if "loss" in r]
