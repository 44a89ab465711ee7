"""`lmtune compare`: each method trained on the same data and budget, scored, and reported; parameter counts by
hand, the starting eval loss against the base model's, mistakes as one line before anything trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_model
from test_bad_inputs import in_process, library_settings_restored, one_line_error  # noqa: F401

from lmtune.cli import main
from lmtune.compare import compare

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = [{"prompt": f"Topic of: {w}", "completion": label}
        for w, label in [("apple pie", "food"), ("guitar solo", "music"), ("fresh bread", "food"), ("drums", "music")]]


@pytest.fixture()
def setup(tmp_path, model_dir, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS * 3))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "cmp.yaml").write_text(f"model: {model_dir}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n"
                                       "train:\n  batch_size: 4\n  save_every: null\n")
    return tmp_path


def test_compare_in_process(setup):
    rows = compare("cmp.yaml", ["methods.lora.train.lr=0.005", "methods.prompt.data.max_length=2"],
                   ["lora", "ia3", "prompt"], steps=3, out="out", max_new_tokens=2, separate=False)
    out = setup / "out"
    by_name = {r["method"]: r for r in rows}
    assert list(by_name) == ["untuned", "lora", "ia3"]
    base = sum(p.numel() for p in build_model("llama").parameters())
    # By hand, tiny llama (hidden 32, k/v width 16, MLP 64, 2 layers): LoRA r=8 on q_proj (32->32) and v_proj
    # (32->16): 8*32 + 32*8 + 8*32 + 16*8 = 896 per layer; IA3 on k_proj, v_proj outputs (16 + 16) and
    # down_proj's input (64): 96 per layer.
    assert (by_name["lora"]["trainable"], by_name["ia3"]["trainable"]) == (2 * 896, 2 * 96)
    assert by_name["lora"]["total"] == base + 2 * 896 and by_name["untuned"]["total"] == base
    assert (by_name["lora"]["lr"], by_name["ia3"]["lr"]) == (0.005, 1e-2)  # the override; the table
    for name in ("lora", "ia3"):  # both start as the base model: the training loop's first eval equals its score
        row = by_name[name]
        assert row["eval_loss_start"] == pytest.approx(by_name["untuned"]["eval_loss_start"], rel=1e-5)
        assert [step for step, _ in row["eval_curve"]] == [0, 1, 2, 3]
        assert row["eval_loss_end"] != row["eval_loss_start"]
        assert row["s_per_step"] > 0 and "peak_memory_bytes" not in row or row["peak_memory_bytes"] is None
        assert row["task_metric"] == "accuracy" and 0 <= row["task_score"] <= 1
    report = (out / "report.md").read_text()
    assert "| lora | 0.005 | 1,792 |" in report and "| ia3 | 0.01 | 192 |" in report
    assert "| prompt | failed: lmtune: error: " in report and "no example has a token to learn" in report
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(rows))
    for png in ("eval_loss.png", "methods.png", "lora/loss.png", "ia3/summary.md"):
        assert (out / png).is_file(), png
    assert (out / "eval_loss.png").read_bytes().startswith(PNG)


def test_compare_from_the_cli_trains_in_separate_processes(setup, capfd):
    code = main(["compare", "cmp.yaml", "--methods", "lora", "--steps", "2", "--out", "out", "--max-new-tokens", "2",
                 "train.lr=0.5", "methods.lora.method.r=2"])
    assert code == 0, capfd.readouterr().err
    assert capfd.readouterr().out.endswith("report written to out/report.md\n")
    row = json.loads((setup / "out" / "report.json").read_text())["rows"][1]
    assert row["method"] == "lora" and row["trainable"] == 2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2)
    assert row["lr"] == 1e-3  # the per-method table wins over the shared train.lr
    assert row["peak_memory_of"] == "process RSS" and row["peak_memory_bytes"] > 50 * 2**20
    assert (setup / "out" / "configs" / "lora.yaml").is_file() and (setup / "out" / "configs" / "lora.log").is_file()


@pytest.mark.parametrize("args, message", [
    (["--steps", "2", "data.eval=null"], "compare needs eval data for its loss curves and accuracy"),
    ([], "compare gives every method the same step budget: set --steps or train.steps"),
    (["--steps", "2", "methods.nope.train.lr=1"], "unknown method 'nope'"),
    (["--steps", "2", "methods.ia3.train.lr=1"], "config: 'methods.ia3' is set but ia3 is not compared (--methods)"),
    (["--steps", "2", "methods.lora.train.lrr=1"], "config: unknown key 'train.lrr'; did you mean 'lr'? (for method "
                                                   "lora)"),
])
def test_mistakes_are_one_line_before_training(setup, capfd, args, message):
    code, stderr = in_process(["compare", "cmp.yaml", "--methods", "lora", "--out", "out", *args], capfd)
    assert one_line_error(code, stderr).startswith(message)
    assert not (setup / "out").exists()
