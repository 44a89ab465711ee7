"""Built-in rule rewards for GRPO, named in YAML as `lmtune.rewards:<function>`.

A reward function takes `prompts` and `completions` (lists of strings, one per completion) and every other
field of the data rows as a list of the same length, and returns one float per completion.
"""

from __future__ import annotations

import re
from typing import Any

ANSWER = re.compile(r"Answer:\s*(-?\d[\d,]*(?:\.\d+)?)")
FINAL_ANSWER = re.compile(r"Answer:\s*-?\d[\d,]*(?:\.\d+)?\s*\.?\s*$")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def answer_format(completions: list[str], **_: Any) -> list[float]:
    """1.0 when the completion ends with a line `Answer: <number>`, else 0.0."""
    return [1.0 if FINAL_ANSWER.search(c.strip()) else 0.0 for c in completions]


def exact_match(completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 when the number after the last `Answer:` equals the row's `answer` field, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        found = ANSWER.findall(completion)
        got = _number(found[-1]) if found else None
        want = _number(str(expected))
        rewards.append(1.0 if got is not None and want is not None and got == want else 0.0)
    return rewards


def length(completions: list[str], target_length: list[Any] | None = None, **_: Any) -> list[float]:
    """-|characters - target| / target: 0 at the row's `target_length` field (default 100 characters)."""
    targets = target_length or [100] * len(completions)
    return [-abs(len(c) - float(t or 100)) / float(t or 100) for c, t in zip(completions, targets, strict=True)]
