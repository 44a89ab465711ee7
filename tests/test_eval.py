"""`lmtune eval`: every metric against a hand calculation on the tiny llama (its logits, its greedy tokens)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer
from test_bad_inputs import in_process, library_settings_restored, one_line_error  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtune.config import load_config
from lmtune.evaluation import normalize, parse_normalize, starts_with_answer
from lmtune.train import run


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_json(args: list[str], capfd) -> dict:
    capfd.readouterr()
    from lmtune.cli import main

    assert main(args) == 0, capfd.readouterr().err
    return json.loads(capfd.readouterr().out)


@pytest.fixture(scope="module")
def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A saved tiny qwen2 (untied head) whose greedy answer is text: the tied tiny llama repeats its last token."""
    path = tmp_path_factory.mktemp("talker")
    build_model("qwen2", seed=3).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path), AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def logps_after(model, ids: list[int], start: int) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= start, straight from the model's logits."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [float(logp[t - 1, ids[t]]) for t in range(max(start, 1), len(ids))]


def test_perplexity_is_exp_of_the_mean_token_nll(base, model_dir, tmp_path, capfd):
    model, tok = base
    texts = ["Hello there, how are you today?", "The capital of France is Paris."]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    nll = [-lp for t in texts for lp in logps_after(model, tok(t + tok.eos_token)["input_ids"], 1)]
    result = eval_json(["eval", "--model", model_dir, "--data", str(data)], capfd)
    assert result["kind"] == "text" and set(result["metrics"]) == {"loss", "perplexity"}
    assert result["metrics"]["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def greedy(model, tok, prompt: str, n: int) -> str:
    """n greedy tokens by hand (argmax of the last position, stop at end of turn)."""
    ids = list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)["input_ids"])
    start = len(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == tok.eos_token_id:
            break
    return tok.decode(ids[start:], skip_special_tokens=True).strip()


def test_exact_match_and_accuracy_of_known_generations(talker, tmp_path, capfd):
    model_dir, model, tok = talker
    said = greedy(model, tok, "What is two plus two?", 3)
    assert said  # the tiny model says something in three tokens
    rows = [{"prompt": "What is two plus two?", "completion": said},  # what it says: a hit
            {"prompt": "What is two plus two?", "completion": said + " and more"},  # longer than what it says
            {"prompt": "What is two plus two?", "completion": "Paris"}]  # a miss
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    result = eval_json(["eval", "--model", model_dir, "--data", str(data), "--max-new-tokens", "3",
                        "--normalize", "none", "--metrics", "exact_match,accuracy"], capfd)
    assert result["metrics"] == {"exact_match": pytest.approx(1 / 3), "accuracy": pytest.approx(1 / 3)}
    assert [m["answer"] for m in result["misses"]] == [said + " and more", "Paris"]
    assert {m["generated"] for m in result["misses"]} == {said}


def test_preference_accuracy_from_hand_log_probs(base, model_dir, tmp_path, capfd):
    model, tok = base
    prompt, answers = "Name three colors:", ["red, green and blue.", "It is four.", "Hello there"]

    def answer_logp(answer: str) -> float:
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        full = tok.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        head_ids, full_ids = tok(head)["input_ids"], tok(full)["input_ids"]
        assert full_ids[:len(head_ids)] == head_ids
        return sum(logps_after(model, full_ids, len(head_ids)))

    pairs = [(0, 1), (1, 0), (0, 2), (2, 1)]
    lp = [answer_logp(a) for a in answers]
    assert len(set(lp)) == 3
    expected = sum(lp[c] > lp[r] for c, r in pairs) / len(pairs)
    assert 0 < expected < 1
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": prompt, "chosen": answers[c], "rejected": answers[r]}
                                                  for c, r in pairs])
    result = eval_json(["eval", "--model", model_dir, "--data", str(data)], capfd)
    assert result["kind"] == "preference"
    assert result["metrics"] == {"preference_accuracy": expected}


def test_a_run_scores_as_its_training_loop_measured_and_writes_eval_json(model_dir, tmp_path, capfd):
    """The eval loss of a trained run equals the training loop's own eval loss on the same file."""
    rows = [{"prompt": f"What is {a} plus {a}?", "completion": f"It is {2 * a}."} for a in range(6)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    summary = run(load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"data.eval={data}",
                                     "train.steps=2", "train.lr=1e-2", f"output_dir={tmp_path / 'run'}",
                                     "method=lora", "train.save_every=null"]))
    result = eval_json(["eval", str(tmp_path / "run"), "--data", str(data), "--metrics", "loss"], capfd)
    assert result["metrics"] == {"loss": pytest.approx(summary["eval_loss"], rel=1e-5)}
    assert json.loads((tmp_path / "run" / "eval.json").read_text()) == result
    before = eval_json(["eval", "--model", model_dir, "--data", str(data), "--metrics", "loss"], capfd)
    assert before["metrics"]["loss"] == pytest.approx(summary["eval_loss_start"], rel=1e-5)  # LoRA starts as the base
    assert before["metrics"]["loss"] > result["metrics"]["loss"] + 1e-3  # and training changed it


@pytest.mark.parametrize("text, steps, expected", [
    ("  The Food.  ", ("case", "punctuation", "whitespace"), "the food"),
    ("The  food", ("articles", "whitespace"), "food"),
    (" Food! ", (), "Food!"),
])
def test_normalize(text, steps, expected):
    assert normalize(text, steps) == expected


@pytest.mark.parametrize("generated, answer, hit", [
    ("food", "food", True), ("food it is", "food", True), ("food.", "food", True),
    ("foodie", "food", False), ("it is food", "food", False), ("", "food", False),
])
def test_accuracy_wants_the_whole_answer_first(generated, answer, hit):
    assert starts_with_answer(generated, answer) is hit


def test_normalize_option_parsing():
    assert parse_normalize(None) == ("case", "punctuation", "whitespace")
    assert parse_normalize("none") == ()
    assert parse_normalize("case, articles") == ("case", "articles")


@pytest.mark.parametrize("args, message", [
    (["--metrics", "preference_accuracy"], "metric 'preference_accuracy' does not apply to text records"),
    (["--metrics", "bleu"], "unknown metric 'bleu'"),
    (["--normalize", "stemming"], "unknown normalisation 'stemming'"),
    (["--max-new-tokens", "0"], "max new tokens must be at least 1 (got 0)"),
])
def test_mistakes_are_one_line(args, message, model_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "Hello there"}])
    code, stderr = in_process(["eval", "--model", model_dir, "--data", str(data), *args], capfd)
    assert one_line_error(code, stderr).startswith(message)


def test_mixed_kinds_are_refused(model_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "Hello there"}, {"prompt": "a", "completion": "b"}])
    code, stderr = in_process(["eval", "--model", model_dir, "--data", str(data)], capfd)
    assert one_line_error(code, stderr) == f"{data}: records of different kinds (answer, text); evaluate each " \
        "kind from its own file"
