"""Resumable training: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run does;
checkpoints are atomic, pruned, pickle-free and hold every trainable parameter; the guards keep progress."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune.resume
import lmtune.tasks
import lmtune.train
from lmtune.config import load_config
from lmtune.errors import LmtuneError
from lmtune.resume import CHECKPOINTS, checkpoints
from lmtune.runlock import RunLock
from lmtune.tasks import get_task
from lmtune.train import run

TEXTS = ["Hi", "The capital of France is Paris.", "What is two plus two? It is four.",
         "I am a small language model made for tests.", "Hello there, how are you today?",
         "red, green and blue", "It is four.", "Paris.", "Name three colors: red, green and blue."]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
# 8 train examples in batches of 3 -> 3 micro-batches an epoch: 8 steps cross epochs mid-step (grad_accum 2).
COMMON = ["train.device=cpu", "train.steps=8", "train.batch_size=3", "train.grad_accum=2", "train.lr=1e-2",
          "data.eval_split=0.1", "train.save_every=2", "train.keep_checkpoints=2"]
METHODS = {"lora": ["method=lora", "method.dropout=0.1", "method.init=random"],
           "full": ["method=full", "train.lr=1e-3"]}

# Runs `lmtune train` in this process, but SIGKILLs itself while writing the state file of checkpoint 6:
# steps 5 and 6 are logged, checkpoint 6 is half-written, only checkpoint 4 is whole.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import lmtune.resume
    real_write = lmtune.resume._write
    def write(path, data):
        if path.name == "state.json" and ".tmp-step-00000006" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)
    lmtune.resume._write = write
    from lmtune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def write_texts(path: Path) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return str(path)


def config(tmp_path: Path, model_dir: str, name: str, *overrides: str):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_texts(data)
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / name}",
                              *COMMON, *overrides])


def curve(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput and step time, which no two runs share."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "step_seconds")} for row in rows]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run_dir / name)


def lmtune_train(tmp_path: Path, model_dir: str, name: str, method: str, script: list[str]):
    args = [f"model.name={model_dir}", f"data.train={tmp_path / 'data.jsonl'}", f"output_dir={tmp_path / name}",
            *COMMON, *METHODS[method]]
    return subprocess.run([sys.executable, *script, "train", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, check=False)


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, model_dir):
    """SIGKILL while checkpoint 6 is half-written; the same command again resumes from 4 and ends the same."""
    write_texts(tmp_path / "data.jsonl")
    with ThreadPoolExecutor(max_workers=2) as pool:
        killed = pool.submit(lmtune_train, tmp_path, model_dir, "resumed", "lora", ["-c", KILLER])
        run(config(tmp_path, model_dir, "straight", *METHODS["lora"]))
        killed = killed.result()
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list((tmp_path / "resumed" / CHECKPOINTS).glob(".tmp-*"))) == 1  # the torn checkpoint 6
    assert_killed_at_6(tmp_path / "resumed")
    run(config(tmp_path, model_dir, "resumed", *METHODS["lora"]))  # what `lmtune train` again runs
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


class Crash(BaseException):
    """Stands for the process dying: nothing catches it."""


def test_crashed_full_run_resumes_the_whole_model(tmp_path, model_dir, monkeypatch):
    """The same in-process for full fine-tuning: every weight, tied embeddings included, is restored."""
    real_write = lmtune.resume._write

    def crash_on_checkpoint_6(path: Path, data: bytes) -> None:
        if path.name == "state.json" and ".tmp-step-00000006" in str(path):
            raise Crash
        real_write(path, data)

    monkeypatch.setattr(lmtune.resume, "_write", crash_on_checkpoint_6)
    with pytest.raises(Crash):
        run(config(tmp_path, model_dir, "resumed", *METHODS["full"]))
    assert_killed_at_6(tmp_path / "resumed")
    monkeypatch.setattr(lmtune.resume, "_write", real_write)
    run(config(tmp_path, model_dir, "resumed", *METHODS["full"]))
    run(config(tmp_path, model_dir, "straight", *METHODS["full"]))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def assert_killed_at_6(run_dir: Path) -> None:
    assert [p.name for p in checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in curve(run_dir)][-1] == 6  # the dead run had logged past checkpoint 4
    assert not (run_dir / "lmtune.json").exists()


def assert_same_run(straight: Path, resumed: Path) -> None:
    assert curve(resumed) == curve(straight)
    assert [r["step"] for r in curve(straight)] == [0, *range(1, 9), 8]  # eval, 8 steps, eval
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert [p.name for p in checkpoints(resumed)] == ["step-00000006", "step-00000008"]
    assert not list((resumed / CHECKPOINTS).glob(".tmp-*"))


def test_checkpointing_does_not_change_the_run(tmp_path, model_dir):
    """Same seed and config -> the same curve, whether checkpoints are written every step or only at the end."""
    run(config(tmp_path, model_dir, "every", *METHODS["lora"], "train.save_every=1"))
    run(config(tmp_path, model_dir, "end", *METHODS["lora"], "train.save_every="))
    run(config(tmp_path, model_dir, "again", *METHODS["lora"], "train.save_every="))
    assert curve(tmp_path / "every") == curve(tmp_path / "end") == curve(tmp_path / "again")
    assert [p.name for p in checkpoints(tmp_path / "end")] == ["step-00000008"]


def test_a_checkpoint_holds_every_trainable_parameter_and_no_pickle(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, "run", "method=lora", "method.target_modules=all-linear", "train.steps=3",
                 "train.save_every=1", "train.keep_checkpoints=2")
    captured = {}
    real_apply = lmtune.train.apply

    def apply_and_keep(*args, **kwargs):
        captured["tuned"] = real_apply(*args, **kwargs)
        return captured["tuned"]

    lmtune.train.apply = apply_and_keep
    try:
        run(cfg)
    finally:
        lmtune.train.apply = real_apply
    found = checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["step-00000002", "step-00000003"]
    last = found[-1]
    assert {p.suffix for p in last.iterdir()} <= {".safetensors", ".json", ".jsonl"}
    tuned = captured["tuned"]
    expected = {name: p for name, p in tuned.named_parameters() if p.requires_grad}
    saved = load_file(last / "trainable.safetensors")
    assert saved.keys() == expected.keys() and len(saved) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name, value in saved.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=0)
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    moments = load_file(last / "optimizer.safetensors")
    assert len({k.split(".")[0] for k in moments}) == len(expected)  # exp_avg etc. for every parameter


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, model_dir, monkeypatch):
    task = get_task("sft")
    objective = task.objective(load_config(None, ["data.train=unused.jsonl"]))
    calls = {"n": 0}

    def nan_on_step_3(model, batch):
        calls["n"] += 1
        loss_sum, count, extra = objective(model, batch)
        return (loss_sum * float("nan") if calls["n"] > 4 else loss_sum), count, extra  # grad_accum 2

    cfg = config(tmp_path, model_dir, "run", *METHODS["lora"], "train.save_every=1", "data.eval_split=0.0")
    monkeypatch.setitem(lmtune.tasks._REGISTRY, "sft", dataclasses.replace(task, objective=lambda cfg: nan_on_step_3))
    with pytest.raises(LmtuneError, match=r"the loss became nan at step 3; .*last good checkpoint is .*step-00000002"):
        run(cfg)
    kept = checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000001", "step-00000002"]
    assert all(torch.isfinite(t).all() for t in load_file(kept[-1] / "trainable.safetensors").values())
    assert not (tmp_path / "run" / "lmtune.json").exists()
    monkeypatch.setitem(lmtune.tasks._REGISTRY, "sft", task)
    run(cfg)  # fixed: resume=auto continues from step 2
    assert [r["step"] for r in curve(tmp_path / "run")] == list(range(1, 9))
    run(config(tmp_path, model_dir, "straight", *METHODS["lora"], "data.eval_split=0.0"))
    assert curve(tmp_path / "run") == curve(tmp_path / "straight")


def test_a_live_run_holds_its_output_directory(tmp_path, model_dir):
    out = tmp_path / "run"
    out.mkdir()
    hold = ("import sys, time; from pathlib import Path; from lmtune.runlock import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LmtuneError, match=rf"in use by a running lmtune process \(pid {holder.pid}\)"):
            run(config(tmp_path, model_dir, "run", "train.steps=1"))
        assert os.listdir(out) == [".lmtune.lock"]  # nothing of the refused run was written
    finally:
        holder.kill()
        holder.wait()
    run(config(tmp_path, model_dir, "run", "train.steps=1"))  # a dead holder's lock is gone with it
    lock = RunLock(out)
    lock.acquire()  # and the finished run released it
    lock.release()


def test_resume_never_overwrite_and_changed_config(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, "run", "train.save_every=1")
    run(cfg)
    (tmp_path / "run" / "lmtune.json").unlink()  # as if killed while writing the result: an unfinished run
    with pytest.raises(LmtuneError, match="holds checkpoints of an unfinished run; resume it"):
        run(config(tmp_path, model_dir, "run", "resume=never"))
    with pytest.raises(LmtuneError, match=r"was trained with train\.lr=0\.01 but this config says 0\.02"):
        run(config(tmp_path, model_dir, "run", "train.lr=2e-2"))
    with pytest.raises(LmtuneError, match="resume: .* is not a checkpoint"):
        run(config(tmp_path, model_dir, "run", f"resume={tmp_path / 'nowhere'}"))
    before = weights(tmp_path / "run")
    summary = run(config(tmp_path, model_dir, "run", "train.save_every=4"))  # resumes at step 8: just saves
    assert summary["steps"] == 8 and (tmp_path / "run" / "lmtune.json").exists()
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path / "run").items())

    run(config(tmp_path, model_dir, "run", "overwrite=true", "train.seed=5"))  # a finished run: start over
    run(config(tmp_path, model_dir, "fresh", "train.seed=5"))
    assert curve(tmp_path / "run") == curve(tmp_path / "fresh")
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000006", "step-00000008"]


def test_resume_from_a_named_checkpoint(tmp_path, model_dir):
    run(config(tmp_path, model_dir, "a", "train.save_every=2", "train.keep_checkpoints=4"))
    source = tmp_path / "a" / CHECKPOINTS / "step-00000004"
    run(config(tmp_path, model_dir, "b", f"resume={source}"))
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_that_became_infinite_are_never_checkpointed(tmp_path, model_dir, monkeypatch):
    """Unclipped infinite gradients with a finite loss: the poisoned step is refused at the checkpoint."""
    task = get_task("sft")
    objective = task.objective(load_config(None, ["data.train=unused.jsonl"]))
    calls = {"n": 0}

    def infinite_gradients_on_step_2(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # the first micro-batch of step 2
            param = next(p for p in model.parameters() if p.requires_grad)
            param.register_hook(lambda grad: grad * float("inf"))
        return objective(model, batch)

    monkeypatch.setitem(lmtune.tasks._REGISTRY, "sft",
                        dataclasses.replace(task, objective=lambda cfg: infinite_gradients_on_step_2))
    cfg = config(tmp_path, model_dir, "run", *METHODS["lora"], "train.save_every=1", "train.max_grad_norm=",
                 "data.eval_split=0.0")
    with pytest.raises(LmtuneError, match=r"the weights became NaN or infinite at step 2; the last good "
                                          r"checkpoint is .*step-00000001; lower train.lr"):
        run(cfg)
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000001"]
