"""The resume contract: a run that dies while writing a checkpoint and is started again ends exactly as an
uninterrupted run (metrics and weights), for every registered method (sft on the tiny llama) and for every task
that reads records (LoRA). The process's death is an exception nothing catches, raised inside the checkpoint
write, as in tests/test_resume.py (which kills a real process for LoRA and crashes full fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _contract import CASES
from safetensors.torch import load_file

import lmtune.resume
from lmtune.config import load_config
from lmtune.tasks import task_names
from lmtune.train import run

TEXTS = ["The capital of France is Paris.", "What is two plus two? It is four.", "Hello there, how are you today?",
         "red, green and blue", "I am a small language model made for tests.", "Name three colors."]
PAIRS = [{"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "Paris."},
         {"prompt": "Name three colors.", "chosen": "red, green and blue", "rejected": "It is four."},
         {"prompt": "Hello there", "chosen": "Hello there, how are you today?", "rejected": "red"},
         {"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "Hello there"}]
RECORDS = {"sft": [{"prompt": t.split(" ")[0], "completion": t} for t in TEXTS], "pretrain": [{"text": t} for t in TEXTS],
           "pairs": PAIRS, "kto": [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                                   for p in PAIRS for k in ("chosen", "rejected")]}
TASK_DATA = {"sft": "sft", "pretrain": "pretrain", "dpo": "pairs", "simpo": "pairs", "orpo": "pairs",
             "reward": "pairs", "kto": "kto"}
"""Every registered task but grpo (its rollouts sample with the run's RNG: tests/test_grpo.py resumes it)."""
COMMON = ["train.device=cpu", "train.steps=3", "train.batch_size=2", "train.lr=1e-2", "train.save_every=1",
          "data.max_length=32", "data.cache=false", "train.schedule=constant", "train.log_every=1"]


class Crash(BaseException):
    """Stands for the process dying: nothing catches it."""


def _config(tmp_path: Path, model_dir: str, name: str, kind: str, *overrides: str):
    data = tmp_path / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[kind]))
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / name}",
                              *COMMON, *overrides])


def _curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_seconds")} for r in rows]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{f.name}:{k}": v for f in sorted(run_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def _crash_then_resume(tmp_path, model_dir, kind: str, overrides: list[str], monkeypatch) -> None:
    real_write = lmtune.resume._write

    def crash_on_checkpoint_3(path: Path, data: bytes) -> None:
        if path.name == "state.json" and ".tmp-step-00000003" in str(path):
            raise Crash
        real_write(path, data)

    monkeypatch.setattr(lmtune.resume, "_write", crash_on_checkpoint_3)
    with pytest.raises(Crash):
        run(_config(tmp_path, model_dir, "resumed", kind, *overrides))
    assert not (tmp_path / "resumed" / "lmtune.json").exists()
    monkeypatch.setattr(lmtune.resume, "_write", real_write)
    run(_config(tmp_path, model_dir, "resumed", kind, *overrides))  # resumes from checkpoint 2
    run(_config(tmp_path, model_dir, "straight", kind, *overrides))
    straight, resumed = _curve(tmp_path / "straight"), _curve(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [1, 2, 3] and resumed == straight
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


def test_every_task_that_reads_records_is_in_the_suite():
    assert sorted(TASK_DATA) == sorted(set(task_names()) - {"grpo"})


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_resumed_run_equals_an_uninterrupted_one_for_every_method(method, tmp_path, model_dir, monkeypatch):
    options = [f"method.{k}={json.dumps(v)}" for k, v in CASES[method].items()]
    lr = ["train.lr=1e-3"] if method in ("full", "freeze") else []
    _crash_then_resume(tmp_path, model_dir, "sft", [f"method={method}", *options, *lr], monkeypatch)


@pytest.mark.parametrize("task", sorted(TASK_DATA))
def test_a_resumed_run_equals_an_uninterrupted_one_for_every_task(task, tmp_path, model_dir, monkeypatch):
    lora = ["method=lora", "method.init=random", "method.dropout=0.1"]  # dropout: the RNG state is restored too
    _crash_then_resume(tmp_path, model_dir, TASK_DATA[task], [f"task={task}", *lora], monkeypatch)
