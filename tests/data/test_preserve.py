"""The forgetting guard (data.preserve): answer cleaning, batched greedy answers against one-by-one generation,
the mix, the cache and the retention report of a real `lmtune train` run on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, build_tokenizer

import lmtune
from lmtune.config import load_config
from lmtune.data import preserve
from lmtune.errors import LmtuneError
from lmtune.inference import reply
from lmtune.train import run

PROMPTS = ["Hello there, how are you?", "What is two plus two?", "Name three colors.", "The capital of France?",
           "Hello", "What is it?", "How are you today?", "Colors: red, green and blue?"]


def test_clean_keeps_finished_answers_trims_cut_ones_and_drops_loops():
    assert preserve.clean("Paris is the capital.", finished=True) == "Paris is the capital."
    assert preserve.clean("Paris is the capital of France. It has a tower that", finished=False) == \
        "Paris is the capital of France."
    assert preserve.clean("no sentence end in this cut answer at all", finished=False) is None
    assert preserve.clean("Short. And", finished=False) is None  # under 20 characters once trimmed
    assert preserve.clean("I am glad. I am glad. I am glad. Really.", finished=True) is None


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time():
    model, tokenizer = build_model("llama"), build_tokenizer()
    texts = [preserve._prompt_text(p, tokenizer, chat=True) for p in PROMPTS]
    batched = preserve.greedy(model, tokenizer, texts, add_special_tokens=False, max_new_tokens=5)
    tuned = lmtune.apply(model, "full")
    for prompt, (answer, _) in zip(PROMPTS, batched, strict=True):
        alone = reply(tuned, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=5)
        assert answer.strip() == alone


def _data(tmp_path, n: int = 6):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Who are you {i}?", "completion": "I am Quill."}) + "\n"
                             for i in range(n)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return train, prompts


def _config(tmp_path, model_dir, train, prompts, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={train}", f"output_dir={tmp_path / 'run'}",
                              "train.device=cpu", "method=lora", "train.steps=2", "train.batch_size=4",
                              f"data.preserve.prompts={prompts}", "data.preserve.held_out=3",
                              "data.preserve.fraction=0.5", "data.preserve.max_new_tokens=4", *extra])


def test_a_run_mixes_base_answers_reports_retention_and_caches_them(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preserve, "clean", lambda text, finished: text or None)  # keep a random model's
    train, prompts = _data(tmp_path)
    calls = []
    real = preserve.generate_answers
    monkeypatch.setattr(preserve, "generate_answers", lambda *a: calls.append(1) or real(*a))
    summary = run(_config(tmp_path, model_dir, train, prompts))
    entry = summary["preserve"]
    assert entry["held_out"] == 3 and entry["mixed_examples"] == 6  # 0.5 / (1 - 0.5) * 6 training examples
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["preserve"] == entry

    # The "before" figures, by hand: the base model, each held-out example alone, on its own base answer.
    base, tokenizer = lmtune.load_model(model_dir)
    answers = preserve.base_answers(base, tokenizer, PROMPTS, True, 4)
    assert len(calls) == 1  # the second call read the cache
    pairs = [(q, a) for q, a in zip(PROMPTS, answers, strict=True) if a is not None]
    import random

    random.Random(preserve.HOLDOUT_SEED).shuffle(pairs)
    hits = total = 0
    nll = 0.0
    for q, a in pairs[:3]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                 tokenize=False)
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        targets = torch.tensor(ids[start:start + len(ids) - start])
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([ids])).logits[0, start - 1:-1]
        targets = targets[: logits.shape[0]]
        hits += int((logits.argmax(-1) == targets).sum())
        nll += float(F.cross_entropy(logits, targets, reduction="sum"))
        total += len(targets)
    assert entry["agreement_before"] == pytest.approx(hits / total)
    assert entry["loss_before"] == pytest.approx(nll / total, abs=1e-4)
    assert 0.0 <= entry["agreement_after"] <= 1.0


@pytest.mark.parametrize("extra, message", [
    (["task=pretrain"], "task sft"),
    (["data.preserve.prompts=missing.txt"], "file not found"),
    (["data.preserve.held_out=50"], "leaves no prompt to train on"),
])
def test_bad_settings_are_one_line_errors(tmp_path, model_dir, monkeypatch, extra, message):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preserve, "clean", lambda text, finished: text or None)
    train, prompts = _data(tmp_path)
    if extra[0].startswith("task"):
        train.write_text(json.dumps({"text": "Hello there."}) + "\n")
    with pytest.raises(LmtuneError, match=message) as err:
        run(_config(tmp_path, model_dir, train, prompts, *extra))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "lmtune.json").exists()


def test_the_shipped_prompts_are_many_and_distinct():
    prompts = preserve.read_prompts("general")
    assert len(prompts) >= 150 and len(set(p.lower() for p in prompts)) == len(prompts)


def _kl_batch():
    """Two right-padded rows, the second an anchored (preserved) answer; labels on the last tokens of each."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 4:7], labels[1, 3:9] = ids[0, 4:7], ids[1, 3:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "anchored": torch.tensor([False, True])}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kl_term_equals_a_hand_computation_from_both_models_logits(method):
    from lmtune.objectives import sft_kl_loss
    from lmtune.tasks import reference

    base = build_model("llama")
    frozen = build_model("llama")  # the same weights: the oracle's reference, untouched by training
    options = {"name": "lora", "init": "random"} if method == "lora" else {"name": "full"}
    tuned = lmtune.apply(base, options)
    if method == "full":
        reference.hold_copy_if_needed(tuned)
        with torch.no_grad():  # the tuned model moves away from the held copy
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn_like(p))
    batch = _kl_batch()
    loss, count, metrics = sft_kl_loss(tuned, batch, weight=0.7)

    with torch.no_grad():
        pol = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        ref = frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    nll = kl = 0.0
    positions = 0
    for row in range(2):
        for t in range(8):
            target = int(batch["labels"][row, t + 1])
            if target == -100:
                continue
            positions += 1
            log_p = torch.log_softmax(pol[row, t], -1)
            nll -= float(log_p[target])
            if row == 1:
                q = torch.softmax(ref[row, t], -1)
                kl += float((q * (q.log() - log_p)).sum())
    assert kl > 1e-3  # the two models differ, so the term is not trivially zero
    assert int(count) == positions == 9
    assert metrics["preserve_kl"] == pytest.approx(kl, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(nll + 0.7 * kl, rel=1e-4)


def test_kl_term_is_zero_for_an_untrained_adapter_and_absent_without_anchored_rows():
    from lmtune.objectives import sft_kl_loss, sft_loss

    tuned = lmtune.apply(build_model("llama"), "lora")  # B = 0: the model is its own base
    batch = _kl_batch()
    loss, _, metrics = sft_kl_loss(tuned, batch, weight=5.0)
    assert metrics["preserve_kl"] == pytest.approx(0.0, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(sft_loss(tuned, batch)[0].detach()), rel=1e-5)
    plain = {k: v for k, v in batch.items() if k != "anchored"}
    assert sft_kl_loss(tuned, plain, weight=5.0)[2] == {}


def test_a_run_with_kl_logs_the_term_and_marks_only_the_preserved_rows(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preserve, "clean", lambda text, finished: text or None)
    train, prompts = _data(tmp_path)
    cfg = _config(tmp_path, model_dir, train, prompts, "data.preserve.kl=1.0", "train.lr=1e-2", "train.steps=3",
                  "train.batch_size=12")  # one batch: every example, task rows and preserved rows together
    base, tokenizer = lmtune.load_model(model_dir)
    from lmtune.data import Example

    task_rows = [Example([5, 6, 7], [-100, 6, 7]) for _ in range(6)]
    mixed, _ = preserve.mix(cfg, base, tokenizer, task_rows)
    assert len(mixed) == 12 and [e.anchored for e in mixed] == [False] * 6 + [True] * 6
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["preserve_kl"] for r in rows if "preserve_kl" in r]
    assert len(kl) == 3 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # LoRA starts as the base


@pytest.mark.parametrize("extra, with_kl", [([], True), (["data.preserve.kl=0"], False)])
def test_the_kl_term_is_on_by_default_with_the_guard_and_only_with_it(tmp_path, extra, with_kl):
    from lmtune.objectives import sft_loss
    from lmtune.tasks import get_task

    train, prompts = _data(tmp_path)
    guarded = get_task("sft").objective(_config(tmp_path, "m", train, prompts, *extra))
    if with_kl:
        assert guarded.keywords == {"weight": 1.0}
    else:
        assert guarded is sft_loss
    unguarded = load_config(None, ["model.name=m", f"data.train={train}"])
    assert get_task("sft").objective(unguarded) is sft_loss


def test_batches_mark_anchored_rows_padded_and_packed():
    from lmtune.data import Example, collate
    from lmtune.data.pack import Packed, collate_packed

    kept, plain = Example([5, 6, 7], [-100, 6, 7], anchored=True), Example([8, 9], [-100, 9])
    assert collate([plain, kept], 0)["anchored"].tolist() == [False, True]
    assert "anchored" not in collate([plain, plain], 0)
    packed = collate_packed([Packed([plain]), Packed([kept, kept])], 0)
    assert packed["anchored"].tolist() == [False, True]


def test_a_packed_run_with_kl_trains_and_logs_the_term(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(preserve, "clean", lambda text, finished: text or None)
    train, prompts = _data(tmp_path)
    run(_config(tmp_path, model_dir, train, prompts, "data.packing=true", "train.lr=1e-2", "train.steps=3",
                "data.max_length=64"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("preserve_kl", 0) > 0 for r in rows)
