"""The training loop on a tiny llama: it learns, accumulation is token-normalised, runs are reproducible,
step counts and the learning-rate schedule are what the config says."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lmtune.train
from lmtune.config import load_config
from lmtune.errors import LmtuneError
from lmtune.train import run

TEXTS = ["Hi", "The capital of France is Paris.", "What is two plus two? It is four.",
         "I am a small language model made for tests. Name three colors: red, green and blue.",
         "Hello there, how are you today?", "red, green and blue", "It is four.", "Paris."]



def write_texts(path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def train(tmp_path, model_dir: str, name: str, *overrides: str, texts: list[str] = TEXTS) -> dict:
    data = write_texts(tmp_path / f"{name}.jsonl", texts)
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / name}",
                             "train.device=cpu", *overrides])
    return run(cfg)


def metrics(tmp_path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, lr", [("lora", 1e-2), ("full", 3e-3)])
def test_training_lowers_the_eval_loss(tmp_path, model_dir, method, lr):
    data = write_texts(tmp_path / "eval.jsonl", TEXTS)
    summary = train(tmp_path, model_dir, "run", f"method={method}", f"data.eval={data}", "train.steps=30",
                    *(["method.target_modules=all-linear"] if method == "lora" else []),
                    "train.batch_size=4", f"train.lr={lr}", "train.schedule=constant")
    rows = [r for r in metrics(tmp_path, "run") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [0, 30]
    assert (rows[0]["eval_loss"], rows[1]["eval_loss"]) == (summary["eval_loss_start"], summary["eval_loss"])
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.2
    assert summary["eval_loss_start"] == pytest.approx(math.log(320), abs=0.2)  # an untrained tiny model


def hand_made_step(model_dir: str, tokenizer, texts: list[str], lr: float) -> tuple[dict, list[torch.Tensor]]:
    """The oracle: one AdamW step on the mean NLL over every label token of all `texts` together; the stepped
    weights and the gradient of each parameter, in `model.parameters()` order."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text + tokenizer.eos_token)["input_ids"]])
        logits = model(input_ids=ids).logits
        total = total + F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        count += ids.shape[1] - 1
    (total / count).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    optimizer.step()
    return model.state_dict(), grads


def trained_weights(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return load_file(tmp_path / name / "model.safetensors")


def first_step_gradients(tmp_path, name: str) -> list[torch.Tensor]:
    """The gradient a run's first optimizer step used, read back from its checkpoint: AdamW's first moment
    after one step is (1 - beta1) * g (parameter index order = the trainable parameters' order)."""
    step = tmp_path / name / "checkpoints" / "step-00000001"
    beta1 = json.loads((step / "state.json").read_text())["optimizer"]["param_groups"][0]["betas"][0]
    moments = load_file(step / "optimizer.safetensors")
    count = sum(key.endswith(".exp_avg") for key in moments)
    return [moments[f"{i}.exp_avg"] / (1 - beta1) for i in range(count)]


def test_gradient_accumulation_is_normalised_by_tokens(tmp_path, model_dir, tokenizer):
    # Label tokens per example: 2, 58, 3, 14. A mean per micro-batch would weigh the short ones far more.
    texts = ["Hi", TEXTS[3] + " " + TEXTS[1], "Paris.", TEXTS[1]]
    common = ["method=full", "train.steps=1", "train.lr=1e-3", "train.schedule=constant", "train.max_grad_norm="]
    train(tmp_path, model_dir, "one", *common, "train.batch_size=4", "train.grad_accum=1", texts=texts)
    train(tmp_path, model_dir, "two", *common, "train.batch_size=2", "train.grad_accum=2", texts=texts)
    train(tmp_path, model_dir, "four", *common, "train.batch_size=1", "train.grad_accum=4", texts=texts)
    oracle, oracle_grads = hand_made_step(model_dir, tokenizer, texts, lr=1e-3)
    one, two = (trained_weights(tmp_path, n) for n in ("one", "two"))
    assert one.keys() == two.keys() == trained_weights(tmp_path, "four").keys()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(not torch.equal(one[key], base[key]) for key in one)  # the step moved every tensor
    for key in one:
        torch.testing.assert_close(one[key], oracle[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6, msg=key)
    # The gradients themselves, for every split: the weights after AdamW's first step cannot show them exactly
    # (it divides by |g| + 1e-8, so an element whose gradient is near 1e-8 turns 1e-10 of summation order into
    # ~1e-6 of update). Summation order moves a gradient by <= 4e-7 of its tensor's largest element here; a mean
    # per micro-batch would be off by a factor of 2-30 on most elements.
    for name in ("one", "two", "four"):
        grads = first_step_gradients(tmp_path, name)
        assert [g.shape for g in grads] == [g.shape for g in oracle_grads]
        for i, (got, want) in enumerate(zip(grads, oracle_grads, strict=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()),
                                       msg=lambda m, name=name, i=i: f"{name}, parameter {i}: {m}")


def test_same_seed_same_run(tmp_path, model_dir):
    args = ["method.dropout=0.1", "train.steps=4", "train.batch_size=3", "train.lr=1e-2", "data.eval_split=0.25"]
    train(tmp_path, model_dir, "a", *args)
    train(tmp_path, model_dir, "b", *args)
    train(tmp_path, model_dir, "c", *args, "train.seed=7")

    def losses(name: str) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("lr"), r.get("grad_norm"))
                for r in metrics(tmp_path, name)]

    assert len(losses("a")) == 6  # eval at step 0, four steps, eval at the end
    assert losses("a") == losses("b")
    assert losses("a") != losses("c")
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_loading_does_not_shift_the_seed(tmp_path, model_dir, monkeypatch):
    """A first-use conversion draws random numbers while loading; the run must not depend on that."""
    args = ["method.init=gaussian", "method.dropout=0.1", "train.steps=2", "train.batch_size=3"]
    train(tmp_path, model_dir, "plain", *args)
    real_load = lmtune.train.load_model

    def load_drawing_random_numbers(*a, **k):
        torch.randn(1000)
        return real_load(*a, **k)

    monkeypatch.setattr(lmtune.train, "load_model", load_drawing_random_numbers)
    train(tmp_path, model_dir, "drawn", *args)
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("plain", "drawn"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, steps", [
    (["train.epochs=2"], 6),  # 10 examples in batches of 4: 3 micro-batches an epoch
    (["train.epochs=2", "train.grad_accum=2"], 3),
    (["train.epochs=0.5"], 2),
    (["train.epochs=2", "train.steps=5"], 5),
])
def test_steps_or_epochs_set_the_step_count(tmp_path, model_dir, overrides, steps):
    summary = train(tmp_path, model_dir, "run", "train.batch_size=4", *overrides, texts=TEXTS + TEXTS[:2])
    assert summary["steps"] == steps
    assert [r["step"] for r in metrics(tmp_path, "run")] == list(range(1, steps + 1))


def warmup_then(schedule: str, step: int, lr: float, warmup: int, steps: int) -> float:
    """The rate optimizer step `step` (1-based) uses: linear warm-up from 0, then the decay."""
    k = step - 1
    if k < warmup:
        return lr * k / warmup
    progress = (k - warmup) / (steps - warmup)
    return lr * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_learning_rate_schedule_in_metrics(tmp_path, model_dir, schedule):
    train(tmp_path, model_dir, "run", f"train.schedule={schedule}", "train.warmup_steps=3", "train.steps=7",
          "train.lr=1e-3", "train.batch_size=8")
    logged = [r["lr"] for r in metrics(tmp_path, "run")]
    assert logged == pytest.approx([warmup_then(schedule, s, 1e-3, 3, 7) for s in range(1, 8)], abs=1e-12)
    assert logged[3] == pytest.approx(1e-3)  # the peak: the first step after warm-up


def test_a_finished_run_is_kept_unless_overwrite(tmp_path, model_dir):
    train(tmp_path, model_dir, "run", "train.steps=1")
    finished = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(LmtuneError, match="already holds a finished run"):
        train(tmp_path, model_dir, "run", "train.steps=1", "train.seed=1")
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == finished
    train(tmp_path, model_dir, "run", "train.steps=1", "train.seed=1", "overwrite=true")
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() != finished


def test_bad_data_fails_before_anything_is_written(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Hi"}\n{"text": \n')
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={bad}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(LmtuneError, match=r"bad\.jsonl:2: not valid JSON"):
        run(cfg)
    assert not (tmp_path / "out").exists()
