"""`lmtune train` against PEFT trained by a plain PyTorch loop from the same start (the oracle): the loop itself
(data order, loss normalised per token over the batch, clipping, AdamW, warm-up + cosine) adds nothing of its own,
so a learning-quality gap between the two can only come from settings (benchmarks/quality.py)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_config, get_peft_model, get_peft_model_state_dict
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

import lmtune
from lmtune import train as train_module
from lmtune.config import load_config
from lmtune.data import collate, tokenize_records
from lmtune.methods import get_method, parse_method_config

PEFT_PREFIX = "base_model.model."
METHODS = {"lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "ia3": {"name": "ia3"}}


def _overrides(method: dict) -> list[str]:
    return [f"method={method['name']}"] + [f"method.{k}={json.dumps(v)}" for k, v in method.items() if k != "name"]


@pytest.mark.parametrize("name", METHODS)
def test_lmtune_train_matches_a_plain_peft_loop_step_for_step(name, tmp_path, model_dir, tokenizer, monkeypatch):
    method = METHODS[name]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i} " * (1 + i % 3), "completion": f"answer {i % 4}"})
                            + "\n" for i in range(11)))  # 11 of unequal lengths: padding, and a short last batch
    steps, lr, warmup, clip = 7, 3e-2, 2, 0.05  # a clip this low is active at every step
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    spec = get_method(name)
    peer = get_peft_model(base, get_peft_config({"peft_type": spec.peft_type, "task_type": "CAUSAL_LM",
                                                 **spec.to_peft(parse_method_config(method), base)}))
    real_apply = train_module.apply

    def apply_from_peers_start(*args, **kwargs):  # both sides start from PEFT's initial adapter
        tuned = real_apply(*args, **kwargs)
        params = dict(tuned.model.named_parameters())
        with torch.no_grad():
            for key, value in get_peft_model_state_dict(peer).items():
                params[key.removeprefix(PEFT_PREFIX)].copy_(value)
        return tuned

    monkeypatch.setattr(train_module, "apply", apply_from_peers_start)
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                             "train.device=cpu", *_overrides(method), f"train.steps={steps}", "train.batch_size=4",
                             f"train.lr={lr}", f"train.warmup_steps={warmup}", f"train.max_grad_norm={clip}",
                             "train.seed=3", "train.save_every=null"])
    train_module.run(cfg)
    ours = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    examples = tokenize_records(str(data), tokenizer, 1024)[0]
    loader = DataLoader(examples, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3),
                        collate_fn=lambda rows: collate(rows, tokenizer.pad_token_id))
    batches = (b for _ in range(steps) for b in loader)
    params = [p for p in peer.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    theirs = []
    peer.train()
    for _ in range(steps):
        b = next(batches)
        loss = peer(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        theirs.append(loss.item())
    assert max(float((p - p0).abs().max()) for p, p0 in zip(params, start, strict=True)) > 1e-2  # it trained
    assert len(ours) == steps and len(set(ours)) == steps
    assert ours == pytest.approx(theirs, rel=1e-4)
    saved, _ = lmtune.load(tmp_path / "run")
    ours_final = dict(saved.model.named_parameters())
    for key, value in get_peft_model_state_dict(peer).items():
        torch.testing.assert_close(ours_final[key.removeprefix(PEFT_PREFIX)], value, atol=1e-5, rtol=0)
