"""Every task trains from a config on a tiny llama: dpo (reference switched off, or precomputed for full),
simpo, pretrain (perplexity), sft with packing; and `lmtune data preview` shows what is learned."""

from __future__ import annotations

import json
import math

import pytest

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import LmtuneError
from lmtune.train import run

PAIRS = [{"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "Paris."},
         {"prompt": "Name three colors.", "chosen": "red, green and blue", "rejected": "It is four."},
         {"prompt": "Hello there", "chosen": "Hello there, how are you today?", "rejected": "red"},
         {"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "Hello there"}]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def train(tmp_path, model_dir, name, data, *overrides):
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / name}",
                             "train.device=cpu", "data.cache=false", *overrides])
    return run(cfg)


def rows(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_learns_the_preferences_from_a_reference_equal_to_the_start(tmp_path, model_dir, method):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    extra = ["method.target_modules=all-linear", "train.lr=2e-2"] if method == "lora" else ["train.lr=2e-3"]
    summary = train(tmp_path, model_dir, method, data, "task=dpo", f"method={method}", f"data.eval={data}",
                    "train.steps=30", "train.batch_size=4", "train.schedule=constant", "preference.beta=1.0",
                    "method.dropout=0" if method == "lora" else "train.seed=1", *extra)
    start = summary["eval_start"]
    # The reference is the model before training (LoRA switched off / log-probs computed up front): no margin.
    assert start["eval_rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["eval_rewards/accuracy"] == 1.0
    assert summary["eval_loss"] < start["eval_loss"] - 0.2
    trained = [r for r in rows(tmp_path, method) if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(trained[-1])


def test_cached_reference_trains_exactly_as_the_switched_off_model(tmp_path, model_dir, monkeypatch):
    """LoRA over several epochs caches the reference log-probs up front (one forward less per step); the run must
    equal one that scores the switched-off model every step. Random init: the untrained adapter is not the base."""
    from lmtune.tasks import reference

    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    args = ["task=dpo", "method.init=random", "method.dropout=0", "train.steps=6", "train.batch_size=2",
            f"data.eval={data}", "train.lr=1e-2", "preference.beta=1.0"]
    calls = []
    cache = reference.cache_pair_logps
    monkeypatch.setattr(reference, "cache_pair_logps", lambda *a, **k: calls.append(1) or cache(*a, **k))
    train(tmp_path, model_dir, "cached", data, *args)  # 12 visits of 4 + 4 pairs: cached
    assert calls == [1]
    monkeypatch.setattr(reference, "cache_pays", lambda *a: False)
    train(tmp_path, model_dir, "switched", data, *args)
    assert calls == [1]
    for a, b in zip(rows(tmp_path, "cached"), rows(tmp_path, "switched"), strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"tokens_per_s", "step_seconds"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_simpo_trains_without_a_reference(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    summary = train(tmp_path, model_dir, "simpo", data, "task=simpo", "method.target_modules=all-linear",
                    f"data.eval={data}", "train.steps=12", "train.lr=2e-2", "train.schedule=constant")
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.2
    assert summary["eval_rewards/accuracy"] == 1.0  # rewards: length-normalised log-probs


def test_pretrain_on_text_reports_perplexity_and_lowers_it(tmp_path, model_dir):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["The capital of France is Paris. What is two plus two? It is four."] * 6))
    summary = train(tmp_path, model_dir, "pretrain", str(text), "task=pretrain", f"data.eval={text}",
                    "data.max_length=16", "method.target_modules=all-linear", "train.steps=20", "train.lr=2e-2")
    start = summary["eval_start"]
    assert start["eval_perplexity"] == pytest.approx(math.exp(start["eval_loss"]))
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert summary["eval_perplexity"] < start["eval_perplexity"] * 0.75


def test_packed_and_unpacked_runs_see_the_same_loss(tmp_path, model_dir):
    records = [{"prompt": p, "completion": c} for p, c in [("Hi", "It is four."), ("Name three colors.", "red"),
                                                           ("What is two plus two?", "It is four."),
                                                           ("Hello", "Hello there, how are you today?")] * 3]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    common = [f"data.eval={data}", "train.steps=2", "data.max_length=64", "method.target_modules=all-linear"]
    packed = train(tmp_path, model_dir, "packed", data, "data.packing=true", *common)
    plain = train(tmp_path, model_dir, "plain", data, *common)
    assert packed["eval_loss_start"] == pytest.approx(plain["eval_loss_start"], abs=1e-4)
    assert packed["data"]["examples"] == plain["data"]["examples"] == 12
    with pytest.raises(LmtuneError, match="data.packing applies to sft and pretrain"):
        train(tmp_path, model_dir, "dpo", write_jsonl(tmp_path / "p.jsonl", PAIRS), "task=dpo", "data.packing=true")


def test_data_preview_marks_the_learned_tokens_and_counts(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "It is four."}, {"prompt": "x"},
                                              {"text": "Hello there", "label": "red"}])
    code = main(["data", "preview", f"model.name={model_dir}", f"data.train={data}", "data.skip_bad_records=true",
                 "data.prompt_template='Q: {text}'", "data.cache=false", "-n", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[It is four.<|im_end|>\n]]" in out
    assert "<|im_start|>user\nQ: Hello there<|im_end|>\n<|im_start|>assistant\n[[red<|im_end|>\n]]" in out
    assert "2 examples" in out and "1 bad records skipped" in out and "0 truncated" in out
    assert f"{data}:2: field 'completion' is missing" in out


@pytest.mark.parametrize("name", ["sft", "instruction", "pretrain", "dpo", "simpo"])
def test_every_example_config_loads_and_its_data_tokenises(name, tokenizer):
    from lmtune.data.pipeline import load_data

    cfg = load_config(f"examples/{name}.yaml", ["data.cache=false"])
    assert cfg.task == name if name in ("pretrain", "dpo", "simpo") else cfg.task == "sft"
    train, evals, stats = load_data(cfg.data, tokenizer, cfg.task, cfg.train.seed)
    assert train and evals and stats.skipped_bad == stats.dropped_no_labels == 0


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("task", ["sft", "pretrain", "dpo", "simpo"])
def test_every_task_trains_with_a_prompt_learning_method(tmp_path, model_dir, task, method):
    """Prompt methods go through the same input hook in every objective; DPO's reference is the prompt switched off."""
    if task in ("dpo", "simpo"):
        data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    elif task == "pretrain":
        data = write_jsonl(tmp_path / "d.jsonl", [{"text": p["chosen"] + " " + p["prompt"]} for p in PAIRS] * 3)
    else:
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS])
    summary = train(tmp_path, model_dir, "run", data, f"task={task}", f"method={method}", f"data.eval={data}",
                    "method.num_virtual_tokens=4", "train.steps=10", "train.lr=3e-2", "train.schedule=constant",
                    *(["data.max_length=16"] if task == "pretrain" else []))
    # (DPO's reference is the base without the prompt; an initialised prompt already moves the policy, so the
    # starting margin is not zero here as it is for LoRA.)
    assert summary["eval_loss"] < summary["eval_loss_start"]
