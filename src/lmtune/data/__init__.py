"""Data: read records -> render and mask -> tokenise -> pad into batches."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lmtune.data.format import IGNORE, render, tokenize
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenStats:
    examples: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped_no_labels: int = 0
    label_tokens: int = 0


def tokenize_records(path: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                     prompt_format: str = "auto") -> tuple[list[Example], TokenStats]:
    """Every record of `path` as an Example; over-long ones are cut from the right and counted."""
    stats = TokenStats()
    examples = []
    for where, record in read_records(path):
        ids, labels = tokenize(render(record, tokenizer, prompt_format, where), tokenizer)
        if len(ids) > max_length:
            stats.truncated += 1
            stats.tokens_cut += len(ids) - max_length
            ids, labels = ids[:max_length], labels[:max_length]
        # Labels are shifted by one in the loss, so the first position never counts.
        if all(label == IGNORE for label in labels[1:]):
            stats.dropped_no_labels += 1
            continue
        stats.label_tokens += sum(label != IGNORE for label in labels[1:])
        examples.append(Example(ids, labels))
    stats.examples = len(examples)
    if not examples:
        raise LmtuneError(f"{path}: no example has a token to learn after truncation to {max_length} tokens; "
                          "raise data.max_length")
    return examples, stats


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
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


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; pads are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
