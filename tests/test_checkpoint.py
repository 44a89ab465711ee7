"""Checkpoints: PEFT-format adapter pairs and plain merged model directories, written atomically,
read strictly (every failure a one-line LmtuneError)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import build_model, logits, trainable
from peft import PeftConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lmtune
from lmtune.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, RUN_INFO, merge_to, save

RANDOM = {"name": "lora", "r": 4, "alpha": 8, "init": "random"}
ATOL = 1e-5




def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)



@pytest.fixture
def run(tmp_path, model_dir, tokenizer):
    """A non-identity LoRA on the tiny llama of `model_dir`, saved: (tuned, run directory)."""
    model, _ = lmtune.load_model(model_dir)
    tuned = lmtune.apply(model, RANDOM, base_name=model_dir)
    save(tuned, tmp_path / "run", tokenizer)
    return tuned, tmp_path / "run"


# --- LoRA round trip and format --------------------------------------------------------------------

def test_lora_round_trip(run, tokenizer):
    tuned, directory = run
    loaded, loaded_tokenizer = lmtune.load(directory)  # base from lmtune.json
    assert loaded.method_config == tuned.method_config and trainable(loaded) == trainable(tuned)
    assert_close(logits(loaded), logits(tuned))
    assert (logits(loaded) - logits(build_model("llama"))).abs().max() > 1e-3
    assert loaded_tokenizer("Hello there").input_ids == tokenizer("Hello there").input_ids


def test_adapter_files_are_peft_format(run, model_dir):
    tuned, directory = run
    state = load_file(directory / ADAPTER_WEIGHTS)
    assert set(state) == {PEFT_PREFIX + name for name in trainable(tuned)}
    key_format = r"base_model\.model\..+\.(q_proj|v_proj)\.lora_[AB]\.weight"
    assert all(re.fullmatch(key_format, key) for key in state)
    assert not (directory / "model.safetensors").exists() and not (directory / "config.json").exists()
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    assert config["base_model_name_or_path"] == model_dir
    peft_config = PeftConfig.from_pretrained(directory)  # PEFT's own parser accepts the file
    assert (peft_config.r, peft_config.lora_alpha) == (4, 8)
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"}


def test_plain_peft_directory_loads_from_adapter_config(run):
    tuned, directory = run
    (directory / RUN_INFO).unlink()  # what PEFT itself writes: no lmtune.json
    loaded, _ = lmtune.load(directory)  # base from adapter_config.json
    assert_close(logits(loaded), logits(tuned))


def test_base_is_recorded_when_apply_was_not_told(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))  # the packaged default must not be touched
    model, _ = lmtune.load_model(model_dir)
    tuned = lmtune.apply(model, RANDOM)
    tuned.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / RUN_INFO).read_text())["base_model"] == model_dir
    assert json.loads((tmp_path / "run" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == model_dir
    loaded, _ = lmtune.load(tmp_path / "run")
    assert_close(logits(loaded), logits(tuned))
    assert not (tmp_path / "cache").exists()


# --- atomic writes ---------------------------------------------------------------------------------

def leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")]


def test_saves_leave_no_temp_dirs_and_overwrite(run, tokenizer):
    tuned, directory = run
    assert not leftovers(directory)
    with torch.no_grad():
        for _name, p in tuned.model.named_parameters():
            if p.requires_grad:
                p.mul_(2)
    save(tuned, directory, tokenizer)
    assert not leftovers(directory)
    loaded, _ = lmtune.load(directory)
    assert_close(logits(loaded), logits(tuned))


def test_failed_save_keeps_the_previous_checkpoint(run):
    tuned, directory = run
    before = logits(tuned)

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with torch.no_grad():
        next(p for p in tuned.model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(OSError):
        save(tuned, directory, Broken())
    assert not leftovers(directory)
    loaded, _ = lmtune.load(directory)
    assert_close(logits(loaded), before)


# --- refusals --------------------------------------------------------------------------------------

def test_adapter_on_base_of_other_hidden_size_is_refused(run, tmp_path, tokenizer):
    _, directory = run
    config = build_model("llama").config
    config.hidden_size = 64
    other = tmp_path / "wider"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(lmtune.LmtuneError, match="shape"):
        lmtune.load(directory, base=str(other))


def test_adapter_with_a_missing_key_is_refused(run):
    _, directory = run
    state = load_file(directory / ADAPTER_WEIGHTS)
    del state[sorted(state)[0]]
    save_file(state, directory / ADAPTER_WEIGHTS)
    with pytest.raises(lmtune.LmtuneError, match="missing"):
        lmtune.load(directory)


@pytest.mark.parametrize("name, damage", [
    (ADAPTER_WEIGHTS, lambda data: b"not a safetensors file"),
    (ADAPTER_WEIGHTS, lambda data: data[: len(data) // 2]),
    (RUN_INFO, lambda data: data[:-5]),
    (ADAPTER_CONFIG, lambda data: b"{"),
], ids=["garbage-weights", "truncated-weights", "truncated-run-info", "broken-adapter-config"])
def test_corrupt_files_are_refused(run, name, damage):
    _, directory = run
    if name == ADAPTER_CONFIG:
        (directory / RUN_INFO).unlink()  # otherwise adapter_config.json is not read
    path = directory / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(lmtune.LmtuneError, match=re.escape(name)):
        lmtune.load(directory)


def test_empty_or_missing_directory_is_refused(tmp_path):
    with pytest.raises(lmtune.LmtuneError, match="holds no"):
        lmtune.load(tmp_path)
    with pytest.raises(lmtune.LmtuneError, match="not found"):
        lmtune.load(tmp_path / "absent")


# --- merging to a plain model ----------------------------------------------------------------------

def test_merge_to_writes_a_plain_model_equal_to_the_unmerged_one(run, tmp_path):
    tuned, directory = run
    out = tmp_path / "merged"
    merge_to(directory, out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / ADAPTER_CONFIG).exists() and not leftovers(out)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.state_dict().keys() == build_model("llama").state_dict().keys()
    assert_close(logits(plain), logits(tuned))
    assert (logits(plain) - logits(build_model("llama"))).abs().max() > 1e-3
    reloaded, _ = lmtune.load(out)  # a plain directory loads too (as a full fine-tune)
    assert_close(logits(reloaded), logits(tuned))


def test_whole_model_saved_without_tokenizer_loads(tmp_path, model_dir):
    """The tokenizer then comes from the recorded base model."""
    tuned = lmtune.apply(build_model("llama"), "full", base_name=model_dir)
    tuned.save(tmp_path)
    loaded, _ = lmtune.load(tmp_path)
    assert_close(logits(loaded), logits(tuned))


def test_merge_refuses_a_non_empty_output(run, model_dir):
    """Merging over an existing model (e.g. the base itself) would destroy it."""
    _, directory = run
    before = sorted(os.listdir(model_dir))
    with pytest.raises(lmtune.LmtuneError, match="not empty"):
        merge_to(directory, model_dir)
    assert sorted(os.listdir(model_dir)) == before
