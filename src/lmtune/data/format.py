"""Records -> token ids and labels, with the loss only on what the model should learn to write.

Every format is rendered to text plus the character spans the model must produce; one tokeniser
call with offsets turns spans into labels (-100 elsewhere). Chat data uses the tokenizer's own chat
template: assistant turn i spans from the render of turns < i with a generation prompt to the render
of turns <= i, so each turn's end-of-turn token is learned too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmtune.errors import LmtuneError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges that carry loss
    add_special_tokens: bool  # chat templates already contain BOS and friends


def _field(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise LmtuneError(f"{where}: field '{key}' must be a string ({found})")
    if not value and not allow_empty:
        raise LmtuneError(f"{where}: field '{key}' is empty")
    return value


def _check_messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LmtuneError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmtuneError(f"{where}: field 'messages[{i}]' needs a role ({', '.join(ROLES)}) "
                              "and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmtuneError(f"{where}: field 'messages' has no assistant turn to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str) -> Rendered:
    if not tokenizer.chat_template:
        raise LmtuneError(f"{where}: chat data needs a chat template, and this model's tokenizer has none; "
                          "use a model with one, or prompt/completion data with data.prompt_format=plain")

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(start)):
            raise LmtuneError(f"{where}: this chat template does not render conversations incrementally, "
                              "so assistant turns cannot be located; give prompt/completion data instead")
        spans.append((len(start), len(upto)))
    return Rendered(text, spans, add_special_tokens=False)


def _prompt_completion(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, fmt: str,
                       where: str) -> Rendered:
    if fmt == "chat" or (fmt == "auto" and tokenizer.chat_template):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return render_chat(messages, tokenizer, where)
    text = prompt + completion + (tokenizer.eos_token or "")
    return Rendered(text, [(len(prompt), len(text))], add_special_tokens=True)


def _render_messages(r: dict, tok: PreTrainedTokenizerBase, fmt: str, where: str) -> Rendered:
    return render_chat(_check_messages(r, where), tok, where)


def _render_prompt_completion(r: dict, tok: PreTrainedTokenizerBase, fmt: str, where: str) -> Rendered:
    prompt = _field(r, "prompt", where, allow_empty=True)
    return _prompt_completion(prompt, _field(r, "completion", where), tok, fmt, where)


def _render_alpaca(r: dict, tok: PreTrainedTokenizerBase, fmt: str, where: str) -> Rendered:
    extra = r.get("input") or ""
    if not isinstance(extra, str):
        raise LmtuneError(f"{where}: field 'input' must be a string")
    prompt = _field(r, "instruction", where) + (f"\n\n{extra}" if extra else "")
    return _prompt_completion(prompt, _field(r, "output", where), tok, fmt, where)


def _render_text(r: dict, tok: PreTrainedTokenizerBase, fmt: str, where: str) -> Rendered:
    text = _field(r, "text", where) + (tok.eos_token or "")
    return Rendered(text, [(0, len(text))], add_special_tokens=True)


# Detected by keys, in this order.
FORMATS: list[tuple[tuple[str, ...], Callable[..., Rendered]]] = [
    (("messages",), _render_messages),
    (("prompt", "completion"), _render_prompt_completion),
    (("instruction", "output"), _render_alpaca),
    (("text",), _render_text),
]


def render(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, prompt_format: str, where: str) -> Rendered:
    for keys, renderer in FORMATS:
        if all(k in record for k in keys):
            return renderer(record, tokenizer, prompt_format, where)
    for keys, _ in FORMATS:  # some keys of a format but not all: name the field that is missing
        missing = [k for k in keys if k not in record]
        if len(missing) < len(keys):
            raise LmtuneError(f"{where}: field '{missing[0]}' is missing (a record with "
                              f"'{next(k for k in keys if k in record)}' needs {', '.join(keys)})")
    expected = "; ".join("+".join(keys) for keys, _ in FORMATS)
    raise LmtuneError(f"{where}: unknown record format with keys {sorted(record)}; expected one of: {expected}")


def tokenize(rendered: Rendered, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(input_ids, labels): a token carries loss when it starts inside a span."""
    enc = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = end > start and any(a <= start < b for a, b in rendered.spans)
        labels.append(token if inside else IGNORE)
    return list(enc["input_ids"]), labels
