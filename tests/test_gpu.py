"""On a CUDA GPU only (skipped elsewhere; benchmarks/gpu_check.sh runs it where one is lent): `precision: auto`
picks bf16 on a bf16 GPU, a short `lmtune train` runs there and its pre-flight estimate is checked against
`torch.cuda.max_memory_allocated`."""

from __future__ import annotations

import json

import pytest
import torch

from lmtune.config import load_config
from lmtune.precision import FAST_BF16_ENV, resolve
from lmtune.train import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_follows_the_gpus_compute_capability(monkeypatch):
    monkeypatch.delenv(FAST_BF16_ENV, raising=False)
    cfg = load_config(None, ["data.train=x.jsonl", "method=lora"])
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp32"
    assert resolve(cfg)[0] == expected


def test_a_run_trains_on_the_gpu_and_measures_its_peak(tmp_path, model_dir, monkeypatch):
    monkeypatch.delenv(FAST_BF16_ENV, raising=False)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                            for w in ["red", "green", "blue", "yellow"] * 4))
    summary = run(load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'r'}",
                                     "train.steps=3", "train.batch_size=4", "method=lora"]))
    assert summary["measured_peak_of"] == "cuda allocated" and summary["measured_peak_bytes"] > 0
    assert summary["predicted_peak_bytes"] > 0 and torch.isfinite(torch.tensor(summary["loss"]))
