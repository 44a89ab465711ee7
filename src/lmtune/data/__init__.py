"""Data: read records -> render and mask -> tokenise (cached) -> blocks / pairs / packed rows -> batches."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from lmtune.data.format import IGNORE, PREFERENCE_KEYS, RenderOptions, detect, render, render_pair, tokenize
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    anchored: bool = False
    """A base-model answer of data.preserve: its rows carry `anchored` in the batch (the KL-to-base term)."""


@dataclass
class Pair:
    """A preference: the same prompt with the chosen and the rejected answer."""

    chosen: Example
    rejected: Example
    ref_logps: tuple[float, float] | None = None
    """Reference log-probabilities (chosen, rejected), when computed once before training."""


@dataclass
class TokenStats:
    examples: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped_no_labels: int = 0
    label_tokens: int = 0
    tokens: int = 0
    skipped_bad: int = 0
    first_bad: str | None = field(default=None, repr=False)

    def add(self, other: TokenStats) -> None:
        for name in ("examples", "truncated", "tokens_cut", "dropped_no_labels", "label_tokens", "tokens",
                     "skipped_bad"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_bad = self.first_bad or other.first_bad


def _truncate(ids: list[int], labels: list[int], max_length: int, stats: TokenStats) -> Example:
    if len(ids) > max_length:
        stats.truncated += 1
        stats.tokens_cut += len(ids) - max_length
    return Example(ids[:max_length], labels[:max_length])


def _learned(e: Example) -> int:
    return sum(label != IGNORE for label in e.labels[1:])  # labels are shifted by one: the first never counts


def _blocks(documents: list[Example], max_length: int) -> list[Example]:
    """Pretraining: every document end to end, cut into blocks of `max_length` (the last may be shorter)."""
    ids = [t for d in documents for t in d.input_ids]
    cut = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    return [Example(block, list(block)) for block in cut if len(block) > 1]


PAIRS = ("pairs", "dpo", "simpo", "reward")
"""`task` values read as preference pairs: `pairs` (what `tasks/` passes), and the names older callers pass."""


def tokenize_records(path: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                     options: RenderOptions | str = "auto", task: str = "sft",
                     skip_bad: bool = False) -> tuple[list[Example] | list[Pair], TokenStats]:
    """Every record of `path` as an Example (a Pair for preference tasks, a block for pretrain); over-long
    ones are cut from the right and counted. With `skip_bad`, records that fail are counted, not fatal."""
    opts = RenderOptions(prompt_format=options) if isinstance(options, str) else options
    stats, items, bad = TokenStats(), [], [] if skip_bad else None
    for where, record in read_records(path, bad):
        try:
            item = tokenize_one(record, tokenizer, opts, task, where)
        except LmtuneError as err:
            if not skip_bad:
                raise
            bad.append(str(err))
            continue
        items.append(item)
    stats.skipped_bad, stats.first_bad = len(bad or ()), (bad or [None])[0]
    if task == "pretrain":
        items = _blocks(items, max_length)
    kept = []
    for item in items:
        parts = [item.chosen, item.rejected] if isinstance(item, Pair) else [item]
        parts = [_truncate(p.input_ids, p.labels, max_length, stats) for p in parts]
        if any(_learned(p) == 0 for p in parts):
            stats.dropped_no_labels += 1
            continue
        stats.label_tokens += sum(_learned(p) for p in parts)
        stats.tokens += sum(len(p.input_ids) for p in parts)
        kept.append(Pair(*parts) if isinstance(item, Pair) else parts[0])
    stats.examples = len(kept)
    if not kept:
        why = f"all {stats.skipped_bad} records are bad (first: {stats.first_bad})" if stats.skipped_bad else \
            f"no example has a token to learn after truncation to {max_length} tokens; raise data.max_length"
        raise LmtuneError(f"{path}: {why}")
    return kept, stats


def tokenize_one(record: dict, tokenizer: PreTrainedTokenizerBase, opts: RenderOptions, task: str,
                  where: str) -> Example | Pair:
    keys = detect(record, where)
    if task in PAIRS:
        if keys != PREFERENCE_KEYS:
            who = "a preference task" if task == "pairs" else f"task {task}"
            raise LmtuneError(f"{where}: {who} needs preference records with fields prompt, chosen, "
                              f"rejected (this one has {', '.join(keys)})")
        return Pair(*(Example(*tokenize(r, tokenizer)) for r in render_pair(record, tokenizer, opts, where)))
    if task == "pretrain" and keys != ("text",):
        raise LmtuneError(f"{where}: task pretrain reads {{\"text\"}} records or .txt files "
                          f"(this one has {', '.join(keys)}); use task: sft for it")
    return Example(*tokenize(render(record, tokenizer, opts, where), tokenizer))


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the examples (at least one when fraction > 0), chosen by `seed`."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(examples)))
    if n_eval >= len(examples):
        raise LmtuneError(f"data.eval_split={fraction} leaves no training example out of {len(examples)}")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def reweight(examples: list, weight: float, seed: int) -> list:
    """`weight` times the examples: whole copies, then a seeded random draw for the fraction."""
    whole, fraction = int(weight), weight - int(weight)
    drawn = random.Random(seed).sample(examples, round(fraction * len(examples)))
    return examples * whole + drawn


def _pad(rows: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    width = width or max(len(e.input_ids) for e in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, e in enumerate(rows):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if any(e.anchored for e in rows):
        batch["anchored"] = torch.tensor([e.anchored for e in rows])
    return batch


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; pads are masked out of attention and loss."""
    return _pad(examples, pad_id)


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows, padded to one width so one forward pass scores both."""
    batch = _pad([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["is_chosen"] = torch.tensor([True] * len(pairs) + [False] * len(pairs))
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],
                                          dtype=torch.float32)
    return batch
