"""Monitoring: TensorBoard scalars read back equal metrics.jsonl, plots and a one-page summary.md per run."""

from __future__ import annotations

import json
import sys

import pytest

from lmtune.config import load_config
from lmtune.errors import LmtuneError
from lmtune.train import run

ROWS = [{"prompt": f"What is {a} plus {a}?", "completion": f"It is {2 * a}."} for a in range(6)]


def config(tmp_path, model_dir, *extra):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"data.eval={data}",
                              "train.steps=3", "train.lr=1e-2", "train.warmup_steps=1", "train.save_every=null",
                              f"output_dir={tmp_path / 'run'}", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_summary_and_plots(tmp_path, model_dir):
    summary = run(config(tmp_path, model_dir))
    out = tmp_path / "run"
    rows = metrics(out)
    losses, evals = [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]
    page = (out / "summary.md").read_text()
    assert "| method | lora (" in page and "| trainable parameters | 1,792 of 30,624 (5.852%) |" in page
    assert "| training data | 6 examples" in page and "| eval data | 6 examples |" in page
    assert "| steps | 3 x effective batch 4 (lr 0.01, cosine, warm-up 1) |" in page
    assert f"| train loss | {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step) |" in page
    assert f"| eval loss | {evals[0]:.4f} (start) -> {evals[-1]:.4f} (end) |" in page
    for name in ("loss.png", "lr.png", "eval.png"):
        assert f"![{name}]({name})" in page and (out / name).read_bytes().startswith(b"\x89PNG")
    assert summary["peak_memory_bytes"] > 0 and summary["eval_examples"] == 6
    assert all(r["step_seconds"] > 0 for r in rows if "loss" in r)


def test_tensorboard_events_hold_the_metrics(tmp_path, model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(config(tmp_path, model_dir, "train.tensorboard=true"))
    rows = metrics(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    for name in ("loss", "lr", "eval_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows if name in r], name
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([0.0, 1e-2, 5e-3])  # warm-up, then cosine


def test_tensorboard_missing_is_one_line_before_anything_is_written(tmp_path, model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as when it is not installed
    with pytest.raises(LmtuneError, match=r"^train.tensorboard needs the tensorboard package: pip install "):
        run(config(tmp_path, model_dir, "train.tensorboard=true"))
    assert not (tmp_path / "run").exists()
