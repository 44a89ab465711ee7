"""Records -> token ids and labels. Expected sequences are built piece by piece with the tokenizer alone:
what the model must write carries its own ids as labels, everything else -100."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer

from lmtune.data import tokenize_records
from lmtune.data.format import render, tokenize
from lmtune.errors import LmtuneError

IGNORE = -100
END = "<|im_end|>"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for text pieces, each learned (True) or context (False)."""
    input_ids, labels = [], []
    for text, learned in pieces:
        piece = ids(tokenizer, text)
        input_ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    return input_ids, labels


def encode(record: dict, tokenizer, prompt_format: str = "auto") -> tuple[list[int], list[int]]:
    return tokenize(render(record, tokenizer, prompt_format, "data.jsonl:1"), tokenizer)


def learned_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE])


def write_jsonl(path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


TWO_TURNS = [{"role": "user", "content": "What is two plus two?"},
             {"role": "assistant", "content": "It is four."}]
FIVE_TURNS = [{"role": "system", "content": "You are a small language model."},
              {"role": "user", "content": "What is two plus two?"},
              {"role": "assistant", "content": "It is four."},
              {"role": "user", "content": "Name three colors."},
              {"role": "assistant", "content": "red, green and blue"}]


def test_two_turn_chat_labels_only_the_assistant_turn(tokenizer):
    want = expected(tokenizer, [
        ("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", False),
        (f"It is four.{END}\n", True)])
    assert encode({"messages": TWO_TURNS}, tokenizer) == want


def test_multi_turn_chat_labels_every_assistant_turn_and_nothing_else(tokenizer):
    input_ids, labels = encode({"messages": FIVE_TURNS}, tokenizer)
    assert (input_ids, labels) == expected(tokenizer, [
        ("<|im_start|>system\nYou are a small language model.<|im_end|>\n"
         "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", False),
        (f"It is four.{END}\n", True),
        ("<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n", False),
        (f"red, green and blue{END}\n", True)])
    assert learned_text(tokenizer, labels) == f"It is four.{END}\nred, green and blue{END}\n"


def test_prompt_completion_uses_the_chat_template_when_there_is_one(tokenizer):
    record = {"prompt": "What is two plus two?", "completion": "It is four."}
    assert encode(record, tokenizer) == encode({"messages": TWO_TURNS}, tokenizer)
    assert encode(record, tokenizer, "chat") == encode({"messages": TWO_TURNS}, tokenizer)


def test_plain_prompt_completion_learns_completion_and_eos(tokenizer):
    record = {"prompt": "What is two plus two?", "completion": " It is four."}
    want = expected(tokenizer, [("What is two plus two?", False), (f" It is four.{END}", True)])
    assert encode(record, tokenizer, "plain") == want
    # Without a chat template, auto means plain.
    assert encode(record, build_tokenizer(chat_template=None)) == want


def test_alpaca_instruction_and_input_form_the_user_turn(tokenizer):
    record = {"instruction": "Name three colors.", "input": "Use English.", "output": "red, green and blue"}
    assert encode(record, tokenizer) == expected(tokenizer, [
        ("<|im_start|>user\nName three colors.\n\nUse English.<|im_end|>\n<|im_start|>assistant\n", False),
        (f"red, green and blue{END}\n", True)])
    no_input = {"instruction": "Name three colors.", "input": "", "output": "red"}
    assert encode(no_input, tokenizer, "plain") == expected(tokenizer, [("Name three colors.", False),
                                                                        (f"red{END}", True)])


def test_text_records_learn_every_token_and_eos(tokenizer):
    input_ids, labels = encode({"text": "The capital of France is Paris."}, tokenizer)
    assert input_ids == ids(tokenizer, f"The capital of France is Paris.{END}")
    assert labels == input_ids


def test_truncation_cuts_from_the_right_and_is_counted(tokenizer, tmp_path):
    short = {"prompt": "Hi", "completion": "It is four."}
    long = {"prompt": "Hi", "completion": "The capital of France is Paris. " * 3}
    full_ids, full_labels = expected(tokenizer, [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), (long["completion"] + f"{END}\n", True)])
    limit = len(full_ids) - 7
    assert len(encode(short, tokenizer)[0]) <= limit
    examples, stats = tokenize_records(write_jsonl(tmp_path / "d.jsonl", [short, long]), tokenizer, limit)
    assert (stats.examples, stats.truncated, stats.tokens_cut, stats.dropped_no_labels) == (2, 1, 7, 0)
    assert (examples[1].input_ids, examples[1].labels) == (full_ids[:limit], full_labels[:limit])
    learnable = sum(t != IGNORE for e in examples for t in e.labels[1:])
    assert stats.label_tokens == learnable


def test_an_example_whose_labels_are_all_cut_is_dropped_and_counted(tokenizer, tmp_path):
    prompt = "I am a small language model made for tests. " * 3
    kept = {"prompt": "Hi", "completion": "It is four."}
    doomed = {"prompt": prompt, "completion": "red"}
    context = ids(tokenizer, f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    path = write_jsonl(tmp_path / "d.jsonl", [kept, doomed, kept])
    examples, stats = tokenize_records(path, tokenizer, max_length=len(context))
    assert (stats.examples, stats.dropped_no_labels, stats.truncated) == (2, 1, 1)
    assert len(examples) == 2
    with pytest.raises(LmtuneError, match="no example has a token to learn"):
        tokenize_records(write_jsonl(tmp_path / "e.jsonl", [doomed]), tokenizer, max_length=len(context))


def error_for(tmp_path, tokenizer, lines: list[str], name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(LmtuneError) as info:
        tokenize_records(str(path), tokenizer, 64)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "FILE")


GOOD = json.dumps({"prompt": "Hi", "completion": "It is four."})


@pytest.mark.parametrize("bad, wanted", [
    ('{"prompt": "Hi", "completion": ', "FILE:3: not valid JSON"),
    (json.dumps({"prompt": "Hi"}), "FILE:3: field 'completion' is missing"),
    (json.dumps({"prompt": "Hi", "completion": 4}), "FILE:3: field 'completion' must be a string"),
    (json.dumps({"prompt": "Hi", "completion": ""}), "FILE:3: field 'completion' is empty"),
    (json.dumps({"messages": [TWO_TURNS[0], {"role": "bot", "content": "x"}]}), "FILE:3: field 'messages[1]'"),
    (json.dumps({"messages": [TWO_TURNS[0], {"role": "assistant"}]}), "FILE:3: field 'messages[1]'"),
    (json.dumps({"messages": [TWO_TURNS[0]]}), "FILE:3: field 'messages' has no assistant turn"),
    (json.dumps({"messages": []}), "FILE:3: field 'messages' must be a non-empty list"),
    (json.dumps({"instruction": "Name a color."}), "FILE:3: field 'output' is missing"),
    (json.dumps({"instruction": "Name a color.", "input": 3, "output": "red"}), "FILE:3: field 'input'"),
    (json.dumps(["Hi", "It is four."]), "FILE:3: a record must be a JSON object, got list"),
    (json.dumps({"question": "Hi", "answer": "four"}), "FILE:3: unknown record format"),
])
def test_a_bad_record_names_file_line_and_field(tokenizer, tmp_path, bad, wanted):
    assert error_for(tmp_path, tokenizer, [GOOD, "", bad, GOOD]).startswith(wanted)


def test_chat_data_without_a_chat_template_is_a_clear_error(tmp_path):
    plain = build_tokenizer(chat_template=None)
    message = error_for(tmp_path, plain, [json.dumps({"messages": TWO_TURNS})])
    assert message.startswith("FILE:1: chat data needs a chat template")
    with pytest.raises(LmtuneError, match="needs a chat template"):
        encode({"prompt": "Hi", "completion": "four"}, plain, "chat")
