"""task kto: the loss on TRL's own batch against TRL's KTOTrainer (the oracle, test-only) with the reference
switched off (LoRA) and as a frozen copy (full), gradients included; our batches of mismatched KL rows against
TRL's collator; the record format; and a few steps from a config that move the held-out rewards the right way."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_model, build_tokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data.format import IGNORE
from lmtune.errors import LmtuneError
from lmtune.tasks import reference
from lmtune.tasks.kto import Unpaired, collate_unpaired, kto_loss
from lmtune.train import run

RECORDS = [{"prompt": "What is two plus two?", "completion": "It is four.", "label": True},
           {"prompt": "Name three colors.", "completion": "Paris", "label": False},
           {"prompt": "Hello there", "completion": "Hello! How are you today?", "label": True},
           {"prompt": "The capital of France?", "completion": "It is five, I think.", "label": False}]


def _trl(policy, ref_model, tokenizer, beta: float, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(RECORDS),
                         report_to=[], use_cpu=True, bf16=False, max_length=128)
    trainer = trl.KTOTrainer(model=policy, ref_model=ref_model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(RECORDS))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    return trainer, batch, trainer.compute_loss(trainer.model, batch)


def _as_ours(batch: dict) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in (("", ""), ("kl_", "KL_")):
        ids = batch[f"{theirs}input_ids"]
        out[f"{ours}input_ids"], out[f"{ours}attention_mask"] = ids, batch[f"{theirs}attention_mask"]
        out[f"{ours}labels"] = ids.masked_fill(batch[f"{theirs}completion_mask"] == 0, IGNORE)
    out["desirable"] = batch["label"].bool()
    return out


def _parity(tuned, batch, trl_loss, beta):
    total, rows, _ = kto_loss(tuned, _as_ours(batch), beta=beta)
    assert int(rows) == len(RECORDS)
    torch.testing.assert_close(total / rows, trl_loss.float(), atol=1e-5, rtol=1e-5)
    assert abs(trl_loss.item() - 0.5) > 1e-4  # policy and reference really differ
    return total / rows


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_kto_with_lora_switched_off_equals_trl_kto_trainer(beta, tmp_path):
    tuned = lmtune.apply(build_model("llama"), {"name": "lora", "init": "random", "target_modules": "all-linear",
                                                "dropout": 0.0})
    policy = copy.deepcopy(tuned).merge()
    base = build_model("llama")
    trainer, batch, trl_loss = _trl(policy, base, build_tokenizer(), beta, tmp_path)
    tuned.train()
    _parity(tuned, batch, trl_loss, beta).backward()  # (TRL's merged copy has no LoRA weights to compare grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.parameters() if p.requires_grad)


def test_kto_with_a_frozen_copy_equals_trl_kto_trainer_gradients_included(tmp_path):
    tuned = lmtune.apply(build_model("llama"), {"name": "full"})
    reference.hold_copy_if_needed(tuned)  # full tuning cannot be switched off: the untrained model is kept
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "trained" away from the reference
    ref_model = copy.deepcopy(tuned.__dict__[reference.HELD].model)
    trainer, batch, trl_loss = _trl(copy.deepcopy(tuned.model), ref_model, build_tokenizer(), 0.5, tmp_path)
    tuned.train()
    _parity(tuned, batch, trl_loss, 0.5).backward()
    trl_loss.backward()
    ours = dict(tuned.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-6, rtol=1e-4)


def test_our_batches_equal_trl_collator_rows(tmp_path):
    tokenizer = build_tokenizer()
    trainer, batch, _ = _trl(build_model("llama"), build_model("llama"), tokenizer, 0.1, tmp_path)
    data = trainer.train_dataset
    rows = [Unpaired(p + c, [IGNORE] * len(p) + c, len(p), bool(label))
            for p, c, label in zip(data["prompt_ids"], data["completion_ids"], data["label"], strict=True)]
    ours, theirs = collate_unpaired(rows, tokenizer.pad_token_id), _as_ours(batch)
    for key in ("input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels"):
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
    assert ours["desirable"].tolist() == [r["label"] for r in RECORDS] and int(ours["loss_units"]) == 4


def _config(tmp_path, model_dir, data, *extra):
    return load_config(None, [f"model={model_dir}", f"data.train={data}", f"data.eval={data}", "task=kto",
                              "data.cache=false", f"output_dir={tmp_path / 'run'}", *extra])


def test_kto_reads_pairs_as_two_records_and_refuses_a_bad_label(tmp_path, model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello there", "rejected": "red"}) + "\n")
    from lmtune.tasks.kto import load_unpaired

    train, _, stats = load_unpaired(_config(tmp_path, model_dir, pairs), build_tokenizer())
    assert [r.desirable for r in train] == [True, False] and stats.examples == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "completion": "red", "label": "good"}) + "\n")
    with pytest.raises(LmtuneError, match=r"bad.jsonl:1: field 'label' must be true .* or false"):
        load_unpaired(_config(tmp_path, model_dir, bad), build_tokenizer())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kto_trains_from_config_and_rewards_take_the_labels_sign(tmp_path, model_dir, method):
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    extra = ["method.target_modules=all-linear", "method.dropout=0", "train.lr=2e-2"] if method == "lora" else [
        "train.lr=2e-3"]
    summary = run(_config(tmp_path, model_dir, data, f"method={method}", "train.steps=15", "train.schedule=constant",
                          "preference.beta=1.0", *extra))
    start = summary["eval_start"]
    assert start["eval_rewards/accuracy"] == 0.0 and start["eval_rewards/signed"] == pytest.approx(0.0, abs=1e-6)
    assert summary["eval_rewards/accuracy"] == 1.0 and summary["eval_rewards/signed"] > 0.2
    assert summary["eval_loss"] < start["eval_loss"] - 0.1


def test_the_example_reads_unpaired_feedback_and_held_out_pairs(tokenizer):
    """examples/kto.yaml: each training sentence once, half its true topic (desirable), half another; every
    held-out sentence as a pair. Label words balanced so no answer-word prior can score on the pairs."""
    from collections import Counter

    from lmtune.tasks.kto import load_unpaired

    cfg = load_config("examples/kto.yaml", ["data.cache=false"])
    train, evals, stats = load_unpaired(cfg, tokenizer)
    assert len(train) == 360 and stats.skipped_bad == stats.dropped_no_labels == 0
    assert len({tuple(r.input_ids[:r.start]) for r in train}) == 360 and sum(r.desirable for r in train) == 180
    assert len(evals) == 200 and [r.desirable for r in evals[:2]] == [True, False]
    words = Counter((tokenizer.decode(r.input_ids[r.start:], skip_special_tokens=True).strip(), r.desirable)
                    for r in train)
    for word in {w for w, _ in words}:
        assert abs(words[word, True] - words[word, False]) <= 0.1 * (words[word, True] + words[word, False]), word
