"""Preference objectives. DPO against TRL's DPOTrainer (the oracle, test-only) on the same batch and
weights; label smoothing (conservative DPO) and SimPO against their published formulas written out here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, build_tokenizer

import lmtune
from lmtune.objectives import dpo_loss, sequence_logps, simpo_loss

PAIRS = [{"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "It is five, I think."},
         {"prompt": "Name three colors.", "chosen": "red, green and blue", "rejected": "Paris"},
         {"prompt": "Hello there", "chosen": "Hello! How are you today?", "rejected": "No."}]


def _trl_batch_and_loss(policy, reference, tokenizer, beta: float, tmp_path) -> tuple[dict, torch.Tensor]:
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(PAIRS),
                         report_to=[], use_cpu=True, max_length=None, bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(PAIRS))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return batch, loss


def _as_our_batch(trl_batch: dict) -> dict[str, torch.Tensor]:
    """TRL's rows (chosen first, then rejected) with its completion mask as our labels."""
    ids = trl_batch["input_ids"]
    half = ids.shape[0] // 2
    return {"input_ids": ids, "attention_mask": trl_batch["attention_mask"],
            "labels": ids.masked_fill(trl_batch["completion_mask"] == 0, -100),
            "is_chosen": torch.arange(ids.shape[0]) < half}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl_dpo_trainer(beta, tmp_path):
    tokenizer = build_tokenizer()
    tuned = lmtune.apply(build_model("llama"), {"name": "lora", "init": "random", "target_modules": "all-linear"})
    tuned.eval()
    policy = copy.deepcopy(tuned).merge()  # the same weights as a plain transformers model, for TRL
    with tuned.disabled():
        reference = copy.deepcopy(tuned.model)  # LoRA modules switched off inside: the base model
    for m in reference.modules():
        if hasattr(m, "disabled"):
            m.disabled = True
    trl_batch, trl_loss = _trl_batch_and_loss(policy, reference, tokenizer, beta, tmp_path)
    with torch.no_grad():
        total, pairs, _ = dpo_loss(tuned, _as_our_batch(trl_batch), beta=beta)
    assert int(pairs) == len(PAIRS)
    torch.testing.assert_close(total / pairs, trl_loss.float(), atol=1e-5, rtol=1e-5)
    assert trl_loss.item() != pytest.approx(0.6931, abs=1e-3)  # policy and reference really differ


def _logps(model, batch):
    with torch.no_grad():
        return sequence_logps(model, batch)


def test_precomputed_reference_gives_the_same_loss_as_the_switched_off_model(tmp_path):
    tuned = lmtune.apply(build_model("llama"), {"name": "lora", "init": "random", "target_modules": "all-linear"})
    tuned.eval()
    trl_batch, _ = _trl_batch_and_loss(copy.deepcopy(tuned).merge(), build_model("llama"), build_tokenizer(), 0.1,
                                       tmp_path)
    batch = _as_our_batch(trl_batch)
    with tuned.disabled():
        ref, _ = _logps(tuned, batch)
    with torch.no_grad():
        switched, _, _ = dpo_loss(tuned, batch)
        precomputed, _, _ = dpo_loss(tuned, {**batch, "ref_logps": ref})
    torch.testing.assert_close(switched, precomputed)


def _manual_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 300, (4, 10), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 8:] = -100
    labels[3, 6:] = -100
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "is_chosen": torch.tensor([1, 1, 0, 0]) > 0}


def test_label_smoothing_is_conservative_dpo_and_metrics_are_rewards():
    """cDPO (Mitchell 2023): -(1-e) log s(b*d) - e log s(-b*d), d = policy margin - reference margin."""
    tuned = lmtune.apply(build_model("llama"), {"name": "lora", "init": "random", "target_modules": "all-linear"})
    tuned.eval()
    batch = _manual_batch()
    policy, _ = _logps(tuned, batch)
    with tuned.disabled():
        ref, _ = _logps(tuned, batch)
    d = (policy[:2] - policy[2:]) - (ref[:2] - ref[2:])
    beta, eps = 0.3, 0.2
    want = (-(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)).sum()
    with torch.no_grad():
        total, _, metrics = dpo_loss(tuned, batch, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(total, want)
    chosen, rejected = beta * (policy[:2] - ref[:2]), beta * (policy[2:] - ref[2:])
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen.sum()), abs=1e-5)
    assert metrics["rewards/margin"] == pytest.approx(float((chosen - rejected).sum()), abs=1e-5)
    assert metrics["rewards/accuracy"] == float((chosen > rejected).sum())
    assert metrics["logp_accuracy"] == float((policy[:2] > policy[2:]).sum())


def test_simpo_is_the_length_normalised_margin_loss_without_a_reference():
    """SimPO (Meng et al. 2024): -log s(b/|y_w| log p(y_w) - b/|y_l| log p(y_l) - gamma)."""
    model = build_model("qwen2")
    batch = _manual_batch()
    labelled = (batch["labels"][:, 1:] != -100).sum(1).float()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = batch["labels"][:, 1:]
    per_token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
    average = per_token.sum(1) / labelled
    beta, gamma = 2.0, 0.7
    want = -F.logsigmoid(beta * average[:2] - beta * average[2:] - gamma).sum()
    total, pairs, _ = simpo_loss(model, batch, beta=beta, gamma=gamma)
    assert int(pairs) == 2
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
