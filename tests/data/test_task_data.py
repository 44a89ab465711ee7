"""Task data: pretrain blocks, classification, last-turn-only, preference pairs, chat template override,
bad records skipped, weighted mixing, the tokenisation cache. Expected tokens come from the tokenizer alone."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer
from test_format import END, FIVE_TURNS, encode, expected, ids, write_jsonl

from lmtune.config import load_config
from lmtune.data import Pair, tokenize_records
from lmtune.data.format import RenderOptions
from lmtune.data.pipeline import load_data
from lmtune.errors import LmtuneError


def test_pretrain_concatenates_documents_and_cuts_blocks(tokenizer, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris.\nIt is four.\n\n\nHello there, how are you today?\n")
    stream = ids(tokenizer, f"The capital of France is Paris.\nIt is four.{END}") + \
        ids(tokenizer, f"Hello there, how are you today?{END}")
    blocks, stats = tokenize_records(str(text), tokenizer, 8, task="pretrain")
    assert [b.input_ids for b in blocks] == [stream[i:i + 8] for i in range(0, len(stream), 8)]
    assert all(b.labels == b.input_ids for b in blocks)
    assert stats.examples == len(blocks) and stats.truncated == 0


def test_pretrain_refuses_records_of_other_tasks(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "It is four."}])
    with pytest.raises(LmtuneError, match=r"d.jsonl:1: task pretrain reads \{\"text\"\} records"):
        tokenize_records(path, tokenizer, 64, task="pretrain")


def test_classification_renders_the_template_and_learns_the_label(tokenizer):
    record = {"text": "Hello there", "label": "red"}
    opts = RenderOptions(prompt_template="Color for: {text}\nAnswer:")
    assert encode(record, tokenizer, opts) == expected(tokenizer, [
        ("<|im_start|>user\nColor for: Hello there\nAnswer:<|im_end|>\n<|im_start|>assistant\n", False),
        (f"red{END}\n", True)])
    plain = RenderOptions(prompt_format="plain", prompt_template="{text} ->")
    assert encode({"text": "Hi", "label": 4}, tokenizer, plain) == expected(tokenizer, [
        ("Hi ->", False), (f" 4{END}", True)])
    with pytest.raises(LmtuneError, match="field 'lang' is missing"):
        encode(record, tokenizer, RenderOptions(prompt_template="{text} in {lang}"))


def test_last_turn_only_learns_just_the_final_assistant_turn(tokenizer):
    got = encode({"messages": FIVE_TURNS}, tokenizer, RenderOptions(assistant_turns="last"))
    assert got == expected(tokenizer, [
        (("<|im_start|>system\nYou are a small language model.<|im_end|>\n"
          "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nIt is four.<|im_end|>\n"
          "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"), False),
        (f"red, green and blue{END}\n", True)])


def test_preference_records_become_pairs_sharing_the_prompt(tokenizer, tmp_path):
    record = {"prompt": "What is two plus two?", "chosen": "It is four.", "rejected": "red"}
    as_turns = {"prompt": [{"role": "system", "content": "Hi"}, {"role": "user", "content": "What is two plus two?"}],
                "chosen": [{"role": "assistant", "content": "It is four."}], "rejected": "red"}
    pairs, stats = tokenize_records(write_jsonl(tmp_path / "p.jsonl", [record, as_turns]), tokenizer, 64, task="dpo")
    prompt = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(pairs[0], Pair) and stats.examples == 2
    assert (pairs[0].chosen.input_ids, pairs[0].chosen.labels) == expected(tokenizer, [
        (prompt, False), (f"It is four.{END}\n", True)])
    assert (pairs[0].rejected.input_ids, pairs[0].rejected.labels) == expected(tokenizer, [
        (prompt, False), (f"red{END}\n", True)])
    assert (pairs[1].rejected.input_ids, pairs[1].rejected.labels) == expected(tokenizer, [
        ("<|im_start|>system\nHi<|im_end|>\n" + prompt, False), (f"red{END}\n", True)])
    sft_path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi", "completion": "four"}])
    with pytest.raises(LmtuneError, match="s.jsonl:1: task dpo needs preference records"):
        tokenize_records(sft_path, tokenizer, 64, task="dpo")
    with pytest.raises(LmtuneError, match="p.jsonl:1: a preference record .* needs task: dpo or simpo"):
        tokenize_records(str(tmp_path / "p.jsonl"), tokenizer, 64, task="sft")


def test_bad_records_are_skipped_and_counted_when_asked(tokenizer, tmp_path):
    good = json.dumps({"prompt": "Hi", "completion": "It is four."})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, '{"prompt": ', json.dumps({"prompt": "Hi"}), good]) + "\n")
    with pytest.raises(LmtuneError, match="d.jsonl:2: not valid JSON"):
        tokenize_records(str(path), tokenizer, 64)
    examples, stats = tokenize_records(str(path), tokenizer, 64, skip_bad=True)
    assert (len(examples), stats.skipped_bad) == (2, 2)
    assert stats.first_bad == f"{path}:2: not valid JSON (Expecting value at column 1)"
    path.write_text('{"prompt": \n')
    with pytest.raises(LmtuneError, match="all 1 records are bad"):
        tokenize_records(str(path), tokenizer, 64, skip_bad=True)


def _config(tmp_path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", *overrides])


def test_sources_are_mixed_by_weight_and_held_out_before_weighting(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"Hi {i}", "completion": "It is four."} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Name {i}", "completion": "red"} for i in range(8)])
    cfg = _config(tmp_path, f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5}}]",
                  "data.eval_split=0.25", "data.cache=false")
    train, evals, stats = load_data(cfg.data, tokenizer, "sft", seed=1)
    assert stats.examples == 18
    assert len(evals) == 2 + 2 and len(train) == 2 * 8 + 3  # 10 -> 8 kept x2; 8 -> 6 kept, half of them
    held = {tuple(e.input_ids) for e in evals}
    assert not held & {tuple(e.input_ids) for e in train}


def test_chat_template_file_replaces_the_tokenizers(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:\n{% endif %}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "It is four."}])
    tokenizer = build_tokenizer(chat_template=None)
    cfg = _config(tmp_path, f"data.train={data}", f"data.chat_template={template}", "data.cache=false")
    train, _, _ = load_data(cfg.data, tokenizer, "sft", seed=1)
    assert (train[0].input_ids, train[0].labels) == expected(tokenizer, [
        ("user:\nHi\nassistant:\n", False), ("It is four.\n", True)])
    template.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")  # escape attempt: sandboxed
    with pytest.raises(LmtuneError, match="d.jsonl:1: the chat template failed on this record"):
        load_data(cfg.data, build_tokenizer(chat_template=None), "sft", seed=1)
    template.write_text("{% for %}")
    with pytest.raises(LmtuneError, match="is not a valid Jinja template"):
        load_data(cfg.data, build_tokenizer(chat_template=None), "sft", seed=1)


def test_tokenisation_is_cached_by_file_tokenizer_and_options(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "It is four."}] * 3)
    cfg = _config(tmp_path, f"data.train={data}")
    first = load_data(cfg.data, build_tokenizer(), "sft", seed=1)

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr("lmtune.data.pipeline.tokenize_records", fail)
    assert load_data(cfg.data, build_tokenizer(), "sft", seed=1) == first
    for changed in ([cfg.data, build_tokenizer(chat_template=None), "sft"],  # another tokenizer
                    [_config(tmp_path, f"data.train={data}", "data.max_length=5").data, build_tokenizer(), "sft"]):
        with pytest.raises(AssertionError, match="tokenised again"):
            load_data(*changed, seed=1)
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "Hi", "completion": "red"}) + "\n")  # new content
    with pytest.raises(AssertionError, match="tokenised again"):
        load_data(cfg.data, build_tokenizer(), "sft", seed=1)
