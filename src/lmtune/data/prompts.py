"""GRPO data: `prompt` records (a string or a list of chat turns) plus any other fields, which the reward
functions receive (e.g. the expected `answer`). The prompt is rendered as the model will continue it:
through the chat template with the assistant's turn opened, or as plain text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmtune.config import DataConfig
from lmtune.data import TokenStats
from lmtune.data.format import _check_turns, _field, _uses_chat
from lmtune.data.pipeline import mix_sources, options, use_chat_template
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError


@dataclass
class PromptRow:
    """One prompt to sample completions for; `fields` are the record's other keys, for the rewards."""

    prompt: str | list[dict[str, str]]
    input_ids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)


def render_prompt(prompt: str | list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    """Token ids the model continues: the chat template up to the assistant's turn, or the plain text."""
    if chat:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise LmtuneError("a prompt given as chat turns needs a chat template; set data.prompt_format=auto or chat")
    return list(tokenizer(prompt)["input_ids"])


def _row(record: dict, where: str, tokenizer: PreTrainedTokenizerBase, chat: bool, max_length: int) -> PromptRow:
    if "prompt" not in record:
        raise LmtuneError(f"{where}: task grpo reads records with a 'prompt' field (this one has "
                          f"{', '.join(sorted(record)) or 'no fields'})")
    value = record["prompt"]
    prompt = _field(record, "prompt", where) if not isinstance(value, list) else _check_turns(value, "prompt", where)
    ids = render_prompt(prompt, tokenizer, chat)
    if len(ids) > max_length:
        raise LmtuneError(f"{where}: the prompt has {len(ids)} tokens, more than data.max_length={max_length}; "
                          "raise data.max_length or shorten the prompt")
    return PromptRow(prompt, ids, {k: v for k, v in record.items() if k != "prompt"})


def read_prompts(path: str, tokenizer: PreTrainedTokenizerBase, d: DataConfig) -> tuple[list[PromptRow], TokenStats]:
    chat = _uses_chat(tokenizer, options(d))
    stats, rows, bad = TokenStats(), [], [] if d.skip_bad_records else None
    for where, record in read_records(path, bad):
        try:
            rows.append(_row(record, where, tokenizer, chat, d.max_length))
        except LmtuneError as err:
            if bad is None:
                raise
            bad.append(str(err))
    stats.skipped_bad, stats.first_bad = len(bad or ()), (bad or [None])[0]
    if not rows:
        raise LmtuneError(f"{path}: no prompt to train on" + (f" (first bad record: {stats.first_bad})"
                                                              if stats.first_bad else ""))
    stats.examples, stats.tokens = len(rows), sum(len(r.input_ids) for r in rows)
    return rows, stats


def load_prompts(d: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> tuple[list, list, TokenStats]:
    """(train, eval, train stats) like `load_data`: held out when no eval file is given, weighted."""
    use_chat_template(tokenizer, d.chat_template)
    return mix_sources(d, seed, lambda source: read_prompts(source.path, tokenizer, d))


def collate_prompts(rows: list[PromptRow]) -> list[PromptRow]:
    """Prompts stay rows: the rollout pads them (on the left, for generation) once it samples."""
    return list(rows)


def preview_prompts(d: DataConfig, tokenizer: PreTrainedTokenizerBase, count: int = 3) -> str:
    """`lmtune data preview` for task grpo: each source's prompts as the model will continue them."""
    use_chat_template(tokenizer, d.chat_template)
    lines = ["task grpo; prompts as the model continues them (completions are sampled, then rewarded)"]
    sources = [("train", s) for s in d.train] + [("eval", s) for s in d.eval or ()]
    for role, source in sources:
        rows, stats = read_prompts(source.path, tokenizer, d)
        lines.append(f"\n{role} {source.path} (weight {source.weight:g}): {stats.examples} prompts, "
                     f"{stats.tokens} tokens, {stats.skipped_bad} bad records skipped")
        for i, row in enumerate(rows[:count] if role == "train" else []):
            lines += [f"--- prompt {i + 1} (reward fields: {json.dumps(row.fields)}) ---",
                      tokenizer.decode(row.input_ids)]
    return "\n".join(lines)
