"""Generation agrees with the model's own teacher-forced forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, build_tokenizer

import lmtune
from lmtune.inference import generate


@pytest.mark.parametrize("method", ["full", {"name": "lora", "init": "random", "target_modules": "all-linear"}])
def test_greedy_generation_equals_teacher_forced_argmax(method) -> None:
    tokenizer = build_tokenizer()
    tuned = lmtune.apply(build_model("llama", seed=3), method)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = tuned.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    n = prompt["input_ids"].shape[1]
    new = out[0, n:]
    with torch.no_grad():
        forced = tuned(input_ids=out[:, :-1]).logits[0, n - 1:].argmax(-1)
    assert torch.equal(forced[: len(new)], new)
    text = generate(tuned, tokenizer, "What is two plus two?", max_new_tokens=8)
    assert text == tokenizer.decode(new, skip_special_tokens=True).strip()
