"""The `lmtune` command as users run it: user errors are one line on stderr and exit 2; one tiny LoRA run goes
through train -> generate -> merge.

Each `lmtune` process spends seconds importing torch, so independent processes run two at a time, and the
error cases whose path to the error is the same in-process call `main` directly.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lmtune.cli import main

_SCRIPT = Path(sys.executable).with_name("lmtune")
LMTUNE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "lmtune.cli"]
# One thread: tiny models on shared CPUs only lose time to thread contention.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
CHAT = {"messages": [{"role": "user", "content": "What is two plus two?"},
                     {"role": "assistant", "content": "It is four."}]}

# In a real process: an error that surfaces after the model is loaded, where a library log line or progress
# bar on stderr would show.
PROCESS_ERRORS = {  # case: (arguments, the start of the message)
    "malformed data line": (["train", "model.name={model}", "data.train=bad.jsonl", "output_dir=out"],
                            "bad.jsonl:2: not valid JSON"),
}
ERRORS = {
    "unknown key": (["train", "data.train=good.jsonl", "train.lrr=1"],
                    "config: unknown key 'train.lrr'; did you mean 'lr'?"),
    "missing data file": (["train", "model.name={model}", "data.train=missing.jsonl", "output_dir=out"],
                          "data file not found: missing.jsonl"),
    "missing config file": (["train", "nope.yaml"], "config file not found: nope.yaml"),
    "wrong type": (["train", "wrong_type.yaml"], "config: 'train.batch_size': Input should be a valid integer"),
    "unknown method": (["train", "data.train=good.jsonl", "method=nope"], "unknown method 'nope'"),
    "not a section": (["train", "data.train=good.jsonl", "data.train.path=x"],
                      "override 'data.train.path': 'train' is not a section"),
    "missing model": (["train", "model.name=./no-such-model", "data.train=good.jsonl", "output_dir=out"],
                      "model not found: ./no-such-model"),
    "generate without a run": (["generate", "no-run", "--prompt", "hi"], "run directory not found: no-run"),
    "chat without a run": (["chat", "no-run"], "run directory not found: no-run"),
    "no new tokens": (["generate", "--model", "{model}", "--prompt", "hi", "--max-new-tokens", "0"],
                      "max new tokens must be at least 1 (got 0)"),
    "negative temperature": (["chat", "--model", "{model}", "--temperature", "-1"], "temperature must be >= 0"),
    "merge without a run": (["merge", "no-run", "--out", "merged"], "run directory not found: no-run"),
}
TRAIN = ["train", "run.yaml", "output_dir=run", "method.r=4"]


def lmtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LMTUNE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def assert_user_error(result: subprocess.CompletedProcess) -> str:
    """Exit 2 and exactly one line on stderr, `lmtune: error: ...`; returns the message."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmtune: error: "), result.stderr
    return lines[0].removeprefix("lmtune: error: ")


def in_process(args: list[str], capfd) -> subprocess.CompletedProcess:
    capfd.readouterr()
    code = main(args)
    return subprocess.CompletedProcess(args, code, *capfd.readouterr())


@pytest.fixture(autouse=True, scope="module")
def library_settings_restored():
    """`main` quiets transformers and sets the lmtune log level for the process; undo it for other tests."""
    import transformers.utils.logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    level, parallelism = logging.getLogger("lmtune").level, os.environ.get("TOKENIZERS_PARALLELISM")
    yield
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()
    logging.getLogger("lmtune").setLevel(level)
    if parallelism is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


@pytest.fixture(scope="module")
def work(tmp_path_factory, model_dir) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "good.jsonl").write_text(json.dumps(CHAT) + "\n")
    (path / "bad.jsonl").write_text(json.dumps(CHAT) + "\n" + '{"messages": [\n')
    (path / "wrong_type.yaml").write_text("data: {train: good.jsonl}\ntrain: {batch_size: four}\n")
    (path / "run.yaml").write_text(f"model: {model_dir}\nmethod: {{name: lora, init: random}}\n"
                                   "data: {train: good.jsonl}\ntrain: {steps: 2, batch_size: 1}\n")
    return path


@pytest.fixture(scope="module")
def processes(work, model_dir) -> dict[str, subprocess.CompletedProcess]:
    """The error cases and the training run, two processes at a time."""
    commands = {case: [a.format(model=model_dir) for a in args] for case, (args, _) in PROCESS_ERRORS.items()}
    commands["train"] = TRAIN
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(commands, pool.map(lambda args: lmtune(*args, cwd=work), commands.values()), strict=True))


@pytest.mark.parametrize("case", list(PROCESS_ERRORS))
def test_user_errors_are_one_line_and_exit_2(processes, work, case):
    assert assert_user_error(processes[case]).startswith(PROCESS_ERRORS[case][1])
    assert not (work / "out").exists()  # a run that cannot start writes nothing


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_in_process(work, model_dir, monkeypatch, capfd, case):
    monkeypatch.chdir(work)
    result = in_process([a.format(model=model_dir) for a in ERRORS[case][0]], capfd)
    assert assert_user_error(result).startswith(ERRORS[case][1])
    assert not (work / "out").exists()


def test_train_generate_merge(processes, work, monkeypatch, capfd):
    trained, run = processes["train"], work / "run"
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.startswith("done: 2 steps, final loss ")
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml",
                 "lmtune.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "adapter_config.json").read_text())["r"] == 4
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    merged = work / "merged"
    with ThreadPoolExecutor(max_workers=2) as pool:
        generated, merging = pool.map(lambda args: lmtune(*args, cwd=work), [
            ["generate", "run", "--prompt", "hi", "--max-new-tokens", "4"], ["merge", "run", "--out", "merged"]])
    assert generated.returncode == 0 and generated.stdout.endswith("\n"), generated.stderr
    assert merging.returncode == 0, merging.stderr
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert_merged_model_matches_run(run, merged)

    monkeypatch.chdir(work)
    assert assert_user_error(in_process(TRAIN, capfd)) == \
        "run already holds a finished run; choose another output_dir or set overwrite=true"


def assert_merged_model_matches_run(run: Path, merged: Path) -> None:
    """The merged directory is a plain transformers model with the run's logits."""
    from transformers import AutoModelForCausalLM

    from lmtune.checkpoint import load

    tuned, tokenizer = load(run)
    plain = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(tuned.base_name)
    ids = tokenizer("What is two plus two?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        torch.testing.assert_close(logits, tuned(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(logits, base(input_ids=ids).logits, atol=1e-3)  # the merge changed something
