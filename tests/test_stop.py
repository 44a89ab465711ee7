"""A run stopped by SIGINT / SIGTERM finishes its step, keeps a checkpoint of it, and resumes to exactly the run
it would have been (oracle: the same config trained without a stop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmtune.config import load_config
from lmtune.resume import checkpoints
from lmtune.stop import stop_on_signal
from lmtune.train import run
from tests.test_resume import ENV, curve, weights, write_texts

# `lmtune train`, each optimizer step slowed down so that the signal lands mid-run.
SLOW = textwrap.dedent("""
    import sys, time
    import lmtune.train
    real = lmtune.train._accumulate
    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)
    lmtune.train._accumulate = slow
    from lmtune.cli import main
    sys.exit(main(sys.argv[1:]))
""")
SETTINGS = ["method=lora", "method.init=random", "train.steps=12", "train.save_every=null", "train.batch_size=3",
            "train.lr=1e-2", "train.device=cpu"]


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [row["step"] for row in map(json.loads, lines) if "loss" in row]


def test_stopped_run_keeps_its_checkpoint_and_resumes_to_the_same_run(tmp_path, model_dir):
    data = write_texts(tmp_path / "data.jsonl")
    out = tmp_path / "stopped"
    args = [f"model.name={model_dir}", f"data.train={data}", f"output_dir={out}", *SETTINGS]
    proc = subprocess.Popen([sys.executable, "-c", SLOW, "train", *args], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(train_steps(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C; SIGTERM takes the same path (below)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr
    stopped_at = train_steps(out)[-1]
    assert 2 <= stopped_at < 12
    assert f"stopped after step {stopped_at} of 12" in stderr and "Traceback" not in stderr
    # save_every=null writes no periodic checkpoint: this one exists because of the stop.
    assert [p.name for p in checkpoints(out)] == [f"step-{stopped_at:08d}"]
    assert not (out / "lmtune.json").exists() and not (out / ".lmtune.lock").exists()

    run(load_config(None, args))  # `lmtune train` again: resumes
    run(load_config(None, [*args, f"output_dir={tmp_path / 'straight'}"]))
    assert curve(out) == curve(tmp_path / "straight")
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_requests_a_stop_and_a_second_acts_as_before(signum):
    before = signal.getsignal(signum)
    with stop_on_signal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
        assert stop.signal == signum
        assert signal.getsignal(signum) is before  # a second Ctrl-C interrupts at once
    assert signal.getsignal(signum) is before
