"""task orpo: the loss on TRL's own batch against TRL's ORPOTrainer (the oracle, test-only), at two betas,
gradients included; and a few steps from a config that raise held-out preference accuracy."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_model, build_tokenizer

import lmtune
from lmtune.config import load_config
from lmtune.tasks.orpo import orpo_loss
from lmtune.train import run

PAIRS = [{"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "It is five, I think."},
         {"prompt": "Name three colors.", "chosen": "red, green and blue", "rejected": "Paris"},
         {"prompt": "Hello there", "chosen": "Hello! How are you today?", "rejected": "No."}]


def _trl(policy, tokenizer, beta: float, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(PAIRS),
                      report_to=[], use_cpu=True, bf16=False, max_length=128)
    trainer = ORPOTrainer(model=policy, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(PAIRS))
    batch = next(iter(trainer.get_train_dataloader()))
    joined = trainer.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id, device="cpu")
    ours = {"input_ids": joined["concatenated_input_ids"], "attention_mask": joined["concatenated_attention_mask"],
            "labels": joined["concatenated_labels"]}
    ours["is_chosen"] = torch.arange(ours["input_ids"].shape[0]) < len(PAIRS)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    return trainer.model, ours, loss


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_and_gradients_equal_trl_orpo_trainer(beta, tmp_path):
    tuned = lmtune.apply(build_model("llama"), {"name": "full"})
    policy = copy.deepcopy(tuned.model)
    trl_model, batch, trl_loss = _trl(policy, build_tokenizer(), beta, tmp_path)
    tuned.train()
    total, pairs, metrics = orpo_loss(tuned, batch, beta=beta)
    assert int(pairs) == len(PAIRS)
    torch.testing.assert_close(total / pairs, trl_loss.float(), atol=1e-5, rtol=1e-5)
    (total / pairs).backward()
    trl_loss.backward()
    ours = dict(tuned.model.named_parameters())
    for name, p in trl_model.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-5, rtol=1e-4)
    assert metrics["nll"] / len(PAIRS) > 1.0  # a random model: the NLL term is really there


def test_orpo_trains_from_config_and_prefers_the_chosen_answers(tmp_path, model_dir):
    pairs = [{"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "Paris."},
             {"prompt": "Name three colors.", "chosen": "red, green and blue", "rejected": "It is four."},
             {"prompt": "Hello there", "chosen": "Hello there, how are you today?", "rejected": "red"},
             {"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "Hello there"}]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = load_config(None, [f"model={model_dir}", f"data.train={data}", f"data.eval={data}", "task=orpo",
                             "method.target_modules=all-linear", "method.dropout=0", "train.steps=20",
                             "train.lr=2e-2", "train.schedule=constant", "preference.beta=1.0", "data.cache=false",
                             f"output_dir={tmp_path / 'run'}"])
    summary = run(cfg)
    start = summary["eval_start"]
    assert start["eval_rewards/accuracy"] < 1.0 and summary["eval_rewards/accuracy"] == 1.0
    assert summary["eval_rewards/margin"] > start["eval_rewards/margin"] + 0.2
    assert summary["eval_loss"] < start["eval_loss"] - 0.2
