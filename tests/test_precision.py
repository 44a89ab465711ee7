"""`train.precision: auto`: detection from the CPU's own flags, the choice per method, and a real run using it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from lmtune.config import load_config
from lmtune.errors import LmtuneError
from lmtune.precision import FAST_BF16_ENV, fast_bf16, resolve
from lmtune.train import run


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo (Linux)")
def test_cpu_detection_agrees_with_the_kernels_cpu_flags(monkeypatch):
    monkeypatch.delenv(FAST_BF16_ENV, raising=False)
    flags = _cpu_flags()
    fast, why = fast_bf16("cpu")
    assert fast == bool(flags & {"amx_bf16", "avx512_bf16"}), why
    if "amx_bf16" in flags:
        assert "AMX" in why


def test_the_environment_overrides_detection(monkeypatch):
    monkeypatch.setenv(FAST_BF16_ENV, "1")
    assert fast_bf16("cpu") == (True, f"{FAST_BF16_ENV}=1")
    monkeypatch.setenv(FAST_BF16_ENV, "0")
    assert fast_bf16("cpu")[0] is False
    monkeypatch.setenv(FAST_BF16_ENV, "")  # set but empty: as if unset
    assert fast_bf16("cpu")[1] != f"{FAST_BF16_ENV}="


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_a_mistyped_override_is_refused(monkeypatch, value):
    monkeypatch.setenv(FAST_BF16_ENV, value)
    with pytest.raises(LmtuneError, match=f"{FAST_BF16_ENV}='{value}': set it to 1"):
        fast_bf16("cpu")


@pytest.mark.parametrize(("fast", "extra", "expected"), [
    ("1", ["method=lora"], "bf16"),
    ("1", ["method=ia3"], "bf16"),
    ("1", ["method=prompt"], "bf16"),
    ("1", ["method=full"], "bf16-mixed"),
    ("1", ["method=freeze"], "bf16-mixed"),
    ("1", ["method=lora", "model.quantization=4bit"], "fp32"),
    ("1", ["method=lora", "model.dtype=bfloat16"], "bf16"),
    ("1", ["method=lora", "model.dtype=float16"], "fp32"),
    ("1", ["method=lora", "train.precision=fp32"], "fp32"),
    ("0", ["method=lora"], "fp32"),
    ("0", ["method=full"], "fp32"),
    ("0", ["method=lora", "train.precision=bf16-mixed"], "bf16-mixed"),
])
def test_auto_picks_per_method_and_device(monkeypatch, fast, extra, expected):
    monkeypatch.setenv(FAST_BF16_ENV, fast)
    cfg = load_config(None, ["data.train=x.jsonl", "train.device=cpu", *extra])
    assert resolve(cfg)[0] == expected


def test_default_is_auto():
    assert load_config(None, ["data.train=x.jsonl"]).train.precision == "auto"


def _records(tmp_path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                            for w in ["red", "green", "blue", "yellow"] * 2))
    return str(path)


@pytest.mark.parametrize(("fast", "weights", "chosen"), [("1", torch.bfloat16, "bf16"), ("0", torch.float32, "fp32")])
def test_a_run_on_auto_trains_in_the_chosen_precision_and_says_so(tmp_path, model_dir, monkeypatch, caplog, fast,
                                                                   weights, chosen):
    monkeypatch.setenv(FAST_BF16_ENV, fast)
    seen = []
    original = torch.nn.Linear.forward

    def spy(self, x):
        seen.append((self.weight.dtype, x.dtype))
        return original(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={_records(tmp_path)}", "train.device=cpu",
                             f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=2",
                             "method=lora", "method.init=random"])
    with caplog.at_level(logging.INFO, logger="lmtune"):
        summary = run(cfg)
    assert summary["precision"] == chosen and torch.isfinite(torch.tensor(summary["loss"]))
    assert f"precision: {chosen} (auto: {FAST_BF16_ENV}={fast}" in caplog.text
    base = {w for w, _ in seen if w != torch.float32}  # the LoRA A / B layers are fp32 either way
    assert base == ({weights} if weights != torch.float32 else set())
    assert f"{chosen}" in (tmp_path / "run" / "summary.md").read_text()
    # the pre-flight estimate traced the same precision the run used
    assert f", {chosen}, " in caplog.text
