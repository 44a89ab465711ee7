"""task reward: the Bradley-Terry loss against a hand calculation and TRL's RewardTrainer.compute_loss (on
transformers' own LlamaForSequenceClassification carrying the same weights: an independent scorer), the head
saved and reloaded with the run (LoRA and full), `lmtune reward`, and a run that learns its pairs."""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model, build_tokenizer
from transformers import LlamaForSequenceClassification

import lmtune
from lmtune.checkpoint import load, save
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data import collate_pairs, tokenize_records
from lmtune.rl.reward_model import HEAD_FILE, attach_head, reward_accuracy, reward_loss, score_texts, scores
from lmtune.train import run

PAIRS = [{"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "Paris."},
         {"prompt": "Name three colors.", "chosen": "red, green and blue", "rejected": "It is four, I think."},
         {"prompt": "Hello there", "chosen": "Hello there, how are you today?", "rejected": "red"}]


def _pairs_batch(tokenizer, tmp_path) -> dict[str, torch.Tensor]:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    pairs, _ = tokenize_records(str(path), tokenizer, 64, "auto", "reward")
    return collate_pairs(pairs, tokenizer.pad_token_id)


def _reward_model(method="lora", seed=0):
    torch.manual_seed(seed)
    tuned = lmtune.apply(build_model("llama"), {"name": method, "init": "random", "target_modules": "all-linear"}
                         if method == "lora" else method)
    attach_head(tuned)
    with torch.no_grad():
        tuned.reward_head.weight.normal_(std=0.5)
        tuned.reward_head.bias.fill_(0.3)
    return tuned.eval()


@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_loss_is_bradley_terry_on_the_last_real_token_by_hand(tmp_path, margin):
    tokenizer = build_tokenizer()
    tuned = _reward_model()
    batch = _pairs_batch(tokenizer, tmp_path)
    with torch.no_grad():
        total, pairs, metrics = reward_loss(tuned, batch, margin=margin)
        hidden = tuned.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states[-1]
    w, b = tuned.reward_head.weight[0].tolist(), float(tuned.reward_head.bias.detach())
    expected, right = 0.0, 0
    n = len(PAIRS)
    values = []
    for row in range(2 * n):
        last = int(batch["attention_mask"][row].sum()) - 1
        values.append(sum(h * wi for h, wi in zip(hidden[row, last].tolist(), w, strict=True)) + b)
    for i in range(n):
        diff = values[i] - values[n + i]
        expected += math.log(1 + math.exp(-(diff - margin)))
        right += diff > 0
    assert int(pairs) == n
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == right


def _trl_reward_loss(model, inputs) -> torch.Tensor:
    """TRL's RewardTrainer.compute_loss itself, on a stand-in for the trainer's bookkeeping."""
    trl = pytest.importorskip("trl")
    fake = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=None),
                           accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                           _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                           _tp_size=1)
    return trl.RewardTrainer.compute_loss(fake, model, dict(inputs))


@pytest.mark.parametrize("margin", [None, 0.5])
def test_loss_equals_trl_reward_trainer_on_a_sequence_classification_model(tmp_path, margin):
    tokenizer = build_tokenizer()
    tuned = _reward_model()
    batch = _pairs_batch(tokenizer, tmp_path)
    merged = copy.deepcopy(tuned).merge()
    oracle = LlamaForSequenceClassification(merged.config.__class__(**{**merged.config.to_dict(), "num_labels": 1,
                                                                      "pad_token_id": tokenizer.pad_token_id}))
    oracle.model.load_state_dict(merged.model.state_dict())
    with torch.no_grad():  # transformers' score layer has no bias; a bias cancels in r_c - r_r anyway
        oracle.score.weight.copy_(tuned.reward_head.weight)
    oracle.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margin is not None:
        inputs["margin"] = torch.full((len(PAIRS),), margin)
    with torch.no_grad():
        trl_loss = _trl_reward_loss(oracle, inputs)
        total, pairs, _ = reward_loss(tuned, batch, margin=margin or 0.0)
    torch.testing.assert_close(total / pairs, trl_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_reward_model_reloads_with_the_same_scores(tmp_path, method, model_dir):
    tokenizer = build_tokenizer()
    tuned = _reward_model(method)
    tuned.model.name_or_path = model_dir
    tuned.base_name = model_dir
    save(tuned, tmp_path / "rm", tokenizer)
    assert (tmp_path / "rm" / HEAD_FILE).is_file()
    reloaded, _ = load(tmp_path / "rm")
    responses = ["It is four.", "red"]
    before = score_texts(tuned, tokenizer, ["What is two plus two?"] * 2, responses)
    after = score_texts(reloaded, tokenizer, ["What is two plus two?"] * 2, responses)
    assert before == pytest.approx(after, abs=1e-6)
    assert before[0] != pytest.approx(before[1])


def test_reward_run_learns_its_pairs_and_cli_scores_with_the_saved_head(tmp_path, model_dir, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"data.eval={data}",
                             f"output_dir={out}", "train.device=cpu", "data.cache=false", "task=reward",
                             "method.target_modules=all-linear", "train.lr=2e-2", "train.steps=25",
                             "train.schedule=constant", "train.batch_size=3"])
    summary = run(cfg)
    assert summary["eval_accuracy"] == 1.0 and summary["eval_loss"] < summary["eval_loss_start"] - 0.3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_accuracy" in r for r in rows if "eval_loss" in r)
    tuned, tokenizer = load(out)
    pair = PAIRS[0]
    expected = score_texts(tuned, tokenizer, [pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
    assert expected[0] > expected[1]
    capsys.readouterr()
    assert main(["reward", str(out), "--prompt", pair["prompt"], "--response", pair["chosen"]]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(expected[0], abs=1e-4)
    batches = [collate_pairs(tokenize_records(str(data), tokenizer, 64, "auto", "reward")[0], tokenizer.pad_token_id)]
    assert reward_accuracy(tuned, batches) == 1.0


def test_scores_need_a_head_and_cli_refuses_a_run_without_one(tmp_path, model_dir, capsys):
    tuned = lmtune.apply(build_model("llama"), "lora")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(lmtune.LmtuneError, match="no reward head"):
        scores(tuned, ids, torch.ones_like(ids))
    tuned.base_name = model_dir
    save(tuned, tmp_path / "plain")
    assert main(["reward", str(tmp_path / "plain"), "--prompt", "x", "--response", "y"]) == 2
    err = capsys.readouterr().err
    assert "holds no reward model" in err and len(err.strip().splitlines()) == 1
