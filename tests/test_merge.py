"""`lmtune merge` beyond the per-method merge tests: an output head tied to the input embeddings, and methods
that cannot merge refused as one line."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, logits
from test_bad_inputs import in_process, library_settings_restored, one_line_error  # noqa: F401
from transformers import AutoModelForCausalLM

import lmtune
from lmtune.checkpoint import merge_to, save


@pytest.mark.parametrize("method", [{"name": "lora", "target_modules": ["lm_head", "q_proj"], "init": "random"},
                                    {"name": "ia3", "target_modules": ["lm_head", "k_proj"], "feedforward_modules": [],
                                     "init": "random"}])
def test_merge_into_a_tied_head_leaves_the_embeddings_alone(method, tmp_path, model_dir, tokenizer):
    """The tiny llama ties lm_head to embed_tokens: folding an update into the head must not change the inputs."""
    base = build_model("llama")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    tuned = lmtune.apply(lmtune.load_model(model_dir)[0], method, base_name=model_dir)
    save(tuned, tmp_path / "run", tokenizer)
    merge_to(tmp_path / "run", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(tuned), rtol=0, atol=1e-4)
    torch.testing.assert_close(merged.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)
    assert (merged.lm_head.weight - base.lm_head.weight).abs().max() > 1e-3  # the head did change


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_merge_of_a_prompt_method_is_refused_with_exit_2(method, tmp_path, model_dir, tokenizer, capfd,
                                                         monkeypatch):
    save(lmtune.apply(lmtune.load_model(model_dir)[0], method, base_name=model_dir), tmp_path / "run", tokenizer)
    monkeypatch.chdir(tmp_path)
    code, stderr = in_process(["merge", "run", "--out", "merged"], capfd)
    assert one_line_error(code, stderr).startswith(f"cannot merge '{method}': ")
    assert not (tmp_path / "merged").exists()
