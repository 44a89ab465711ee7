"""Records -> token ids and labels, with the loss only on what the model should learn to write.

Every format is rendered to text plus the character spans the model must produce; one tokeniser
call with offsets turns spans into labels (-100 elsewhere). Chat data uses the tokenizer's own chat
template: assistant turn i spans from the render of turns < i with a generation prompt to the render
of turns <= i, so each turn's end-of-turn token is learned too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from lmtune.errors import LmtuneError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RenderOptions:
    """How records become text (the data.* keys of the same names)."""

    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    assistant_turns: Literal["all", "last"] = "all"
    prompt_template: str = "{text}\nLabel:"


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
    messages = _check_turns(record.get("messages"), "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise LmtuneError(f"{where}: field 'messages' has no assistant turn to learn from")
    return messages


def _check_turns(messages: Any, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LmtuneError(f"{where}: field '{field}' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmtuneError(f"{where}: field '{field}[{i}]' needs a role ({', '.join(ROLES)}) "
                              "and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str,
                turns: str = "all", first: int = 0) -> Rendered:
    """The conversation through the chat template; assistant turns from index `first` on carry loss
    (only the last of them when `turns` is "last")."""
    if not tokenizer.chat_template:
        raise LmtuneError(f"{where}: chat data needs a chat template, and this model's tokenizer has none; "
                          "give one as a Jinja file in data.chat_template, or use prompt/completion data "
                          "with data.prompt_format=plain")

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        try:  # transformers renders in jinja2's sandbox: a template cannot reach Python internals
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as err:
            raise LmtuneError(f"{where}: the chat template failed on this record ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None

    learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first]
    text = render(messages, False)
    spans = []
    for i in learned[-1:] if turns == "last" else learned:
        start, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(start)):
            raise LmtuneError(f"{where}: this chat template does not render conversations incrementally, "
                              "so assistant turns cannot be located; give prompt/completion data instead")
        spans.append((len(start), len(upto)))
    return Rendered(text, spans, add_special_tokens=False)


def _uses_chat(tokenizer: PreTrainedTokenizerBase, opts: RenderOptions) -> bool:
    return opts.prompt_format == "chat" or (opts.prompt_format == "auto" and bool(tokenizer.chat_template))


def _prompt_completion(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, opts: RenderOptions,
                       where: str) -> Rendered:
    if _uses_chat(tokenizer, opts):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return render_chat(messages, tokenizer, where)
    text = prompt + completion + (tokenizer.eos_token or "")
    return Rendered(text, [(len(prompt), len(text))], add_special_tokens=True)


def _render_messages(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> Rendered:
    return render_chat(_check_messages(r, where), tok, where, opts.assistant_turns)


def _render_prompt_completion(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> Rendered:
    return _prompt_completion(*_prompt_completion_parts(r, tok, opts, where), tok, opts, where)


def _prompt_completion_parts(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions,
                             where: str) -> tuple[str, str]:
    return _field(r, "prompt", where, allow_empty=True), _field(r, "completion", where)


def _render_alpaca(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> Rendered:
    return _prompt_completion(*_alpaca_parts(r, tok, opts, where), tok, opts, where)


def _alpaca_parts(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> tuple[str, str]:
    extra = r.get("input") or ""
    if not isinstance(extra, str):
        raise LmtuneError(f"{where}: field 'input' must be a string")
    prompt = _field(r, "instruction", where) + (f"\n\n{extra}" if extra else "")
    return prompt, _field(r, "output", where)


def _render_classification(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> Rendered:
    return _prompt_completion(*_classification_parts(r, tok, opts, where), tok, opts, where)


def _classification_parts(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions,
                          where: str) -> tuple[str, str]:
    """text + label: the prompt template filled from the record, the label as the completion."""
    label = r.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise LmtuneError(f"{where}: field 'label' must be a non-empty string or an integer")
    _field(r, "text", where)
    try:
        prompt = opts.prompt_template.format_map(r)
    except KeyError as err:
        raise LmtuneError(f"{where}: field {err} is missing (data.prompt_template names it)") from None
    except (ValueError, IndexError) as err:
        raise LmtuneError(f"data.prompt_template is not a valid template ({err}); "
                          "write fields as {{name}}") from None
    plain = not _uses_chat(tok, opts)
    return prompt, (" " if plain else "") + str(label)


def _render_text(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> Rendered:
    text = _field(r, "text", where) + (tok.eos_token or "")
    return Rendered(text, [(0, len(text))], add_special_tokens=True)


def _turns_or_text(r: dict, key: str, role: str, where: str) -> list[dict[str, str]]:
    value = r.get(key)
    if isinstance(value, str):
        _field(r, key, where, allow_empty=key == "prompt")
        return [{"role": role, "content": value}]
    return _check_turns(value, key, where)


def render_pair(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> tuple[Rendered, Rendered]:
    """A preference record -> (chosen, rejected), each the prompt followed by its answer, the answer learned.

    `prompt` is a string (one user turn) or a list of turns; `chosen` / `rejected` a string (one assistant
    turn) or a list of turns that continue the prompt."""
    if not _uses_chat(tok, opts):
        prompt = _field(r, "prompt", where, allow_empty=True)
        return (_prompt_completion(prompt, _field(r, "chosen", where), tok, opts, where),
                _prompt_completion(prompt, _field(r, "rejected", where), tok, opts, where))
    prompt = _turns_or_text(r, "prompt", "user", where)
    answers = [_turns_or_text(r, key, "assistant", where) for key in ("chosen", "rejected")]
    for key, turns in zip(("chosen", "rejected"), answers, strict=True):
        if not any(m["role"] == "assistant" for m in turns):
            raise LmtuneError(f"{where}: field '{key}' has no assistant turn")
    chosen, rejected = (render_chat(prompt + turns, tok, where, first=len(prompt)) for turns in answers)
    return chosen, rejected


def _preference_needs_task(r: dict, tok: PreTrainedTokenizerBase, opts: RenderOptions, where: str) -> Rendered:
    raise LmtuneError(f"{where}: a preference record (prompt, chosen, rejected) needs task: dpo or simpo, "
                      "or reward for a reward model")


# Detected by keys, in this order.
FORMATS: list[tuple[tuple[str, ...], Callable[..., Rendered]]] = [
    (("messages",), _render_messages),
    (("prompt", "completion"), _render_prompt_completion),
    (("instruction", "output"), _render_alpaca),
    (("prompt", "chosen", "rejected"), _preference_needs_task),
    (("text", "label"), _render_classification),
    (("text",), _render_text),
]
PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


# Formats with one prompt and one answer: the answer is what generation is scored against (lmtune eval).
PROMPTED: dict[tuple[str, ...], Callable[..., tuple[str, str]]] = {
    ("prompt", "completion"): _prompt_completion_parts,
    ("instruction", "output"): _alpaca_parts,
    ("text", "label"): _classification_parts,
}


def prompt_and_answer(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, options: RenderOptions,
                      where: str) -> tuple[str, str] | None:
    """(prompt, answer) of a record as training renders them, or None for formats without a single answer."""
    parts = PROMPTED.get(detect(record, where))
    return None if parts is None else parts(record, tokenizer, options, where)


def uses_chat(tokenizer: PreTrainedTokenizerBase, options: RenderOptions) -> bool:
    """Whether prompts go through the chat template (else they are plain text)."""
    return _uses_chat(tokenizer, options)


def detect(record: dict[str, Any], where: str) -> tuple[str, ...]:
    """The keys of the record's format (see FORMATS), or an error naming the missing field."""
    for keys, _ in FORMATS:
        if all(k in record for k in keys):
            return keys
    for keys, _ in FORMATS:  # some keys of a format but not all: name the field that is missing
        missing = [k for k in keys if k not in record]
        if len(missing) < len(keys):
            raise LmtuneError(f"{where}: field '{missing[0]}' is missing (a record with "
                              f"'{next(k for k in keys if k in record)}' needs {', '.join(keys)})")
    expected = "; ".join("+".join(keys) for keys, _ in FORMATS)
    raise LmtuneError(f"{where}: unknown record format with keys {sorted(record)}; expected one of: {expected}")


def render(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, options: RenderOptions | str,
           where: str) -> Rendered:
    """One record as text + learned spans; `options` may be just a data.prompt_format value."""
    opts = RenderOptions(prompt_format=options) if isinstance(options, str) else options
    return dict(FORMATS)[detect(record, where)](record, tokenizer, opts, where)


def tokenize(rendered: Rendered, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(input_ids, labels): a token carries loss when it starts inside a span."""
    enc = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        inside = end > start and any(a <= start < b for a, b in rendered.spans)
        labels.append(token if inside else IGNORE)
    return list(enc["input_ids"]), labels
