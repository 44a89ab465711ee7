#!/usr/bin/env python
"""Write the small example data sets of the task YAMLs (fixed seeds: the same files every run).

``examples/data/``
    ``parity_prefs.jsonl`` / ``parity_prefs_eval.jsonl``  (dpo.yaml, simpo.yaml, orpo.yaml, reward.yaml)
        Preferences: "Is N even?" with the right answer chosen and the wrong one rejected. The numbers are
        drawn at random, so about half the right answers are "Yes": 153 of the 320 training pairs, 48 of
        the 80 held-out ones. A model with no sense of parity that always prefers "Yes" scores 0.60 on the
        held-out pairs, one that always prefers "No" 0.40 (benchmarks/orpo_kto_figures.py splits the
        accuracy by the right answer); the eval numbers appear nowhere in training.
    ``chronicle.txt`` / ``chronicle_eval.txt``  (pretrain.yaml)
        Plain text in one invented style (a chronicle of made-up towns), paragraphs separated by a
        blank line; the eval text is new paragraphs in the same style.
    ``reviews.jsonl``  (sft.yaml): text + label classification records (positive / negative).
    ``alpaca.jsonl``  (instruction.yaml): instruction / input / output records.
    ``chats.jsonl``  (instruction.yaml): multi-turn conversations with a system prompt.
Run from the repository root: python examples/make_task_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"


def write_jsonl(name: str, records: list[dict]) -> None:
    (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def parity(rng: random.Random, numbers: list[int]) -> list[dict]:
    records = []
    for n in numbers:
        even = n % 2 == 0
        yes, no = f"Yes, {n} is even.", f"No, {n} is odd."
        records.append({"prompt": rng.choice(["Is {n} an even number?", "Is {n} even?",
                                              "Tell me: is {n} even?"]).format(n=n),
                        "chosen": yes if even else no, "rejected": no if even else yes})
    return records


TOWNS = ["Ashford", "Bramblecote", "Coldharbour", "Dunmere", "Eskholt", "Fernwick", "Greyhollow", "Harrowgate",
         "Ivybridge", "Juniper Cross", "Kestrel Bay", "Larkspur", "Millbrook", "Northwold", "Oakhaven", "Pennyfield"]
GOODS = ["wool", "salt", "copper pots", "barley", "river fish", "candles", "blue cloth", "apples", "honey", "rope"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
TRADES = ["bell-founders", "weavers", "lantern-makers", "boatwrights", "beekeepers", "millers", "glassblowers"]


def chronicle(rng: random.Random, count: int) -> str:
    paragraphs = []
    for _ in range(count):
        town, other = rng.sample(TOWNS, 2)
        paragraphs.append(
            f"The town of {town} lies {rng.randint(3, 40)} miles {rng.choice(['north', 'south', 'east', 'west'])} "
            f"of {other}. Its market sells {rng.choice(GOODS)} and {rng.choice(GOODS)} every "
            f"{rng.choice(DAYS)}, and its {rng.choice(TRADES)} are known across the valley. "
            f"In the year {rng.randint(1100, 1400)} the river flooded, and the people of {town} "
            f"rebuilt the bridge with stone from {other}.")
    return "\n\n".join(paragraphs) + "\n"


GOOD = ["I loved it", "wonderful service", "the best meal in town", "great value and friendly staff",
        "would happily come back", "fresh, tasty and quick"]
BAD = ["I hated it", "rude service", "cold food and a long wait", "far too expensive", "never again",
       "stale, bland and slow"]


def reviews(rng: random.Random, count: int) -> list[dict]:
    records = []
    for _ in range(count):
        positive = rng.random() < 0.5
        a, b = rng.sample(GOOD if positive else BAD, 2)
        records.append({"text": f"Review: {a}; {b}.", "label": "positive" if positive else "negative"})
    return records


def alpaca(rng: random.Random, count: int) -> list[dict]:
    records = []
    for _ in range(count):
        words = rng.sample(["river", "lantern", "copper", "meadow", "falcon", "harbour", "willow", "ember"], 3)
        kind = rng.choice(["sort", "reverse", "upper"])
        if kind == "sort":
            records.append({"instruction": "Sort these words alphabetically.", "input": ", ".join(words),
                            "output": ", ".join(sorted(words))})
        elif kind == "reverse":
            records.append({"instruction": "List these words in reverse order.", "input": ", ".join(words),
                            "output": ", ".join(reversed(words))})
        else:
            records.append({"instruction": f"Write the word '{words[0]}' in capital letters.", "input": "",
                            "output": words[0].upper()})
    return records


def chats(rng: random.Random, count: int) -> list[dict]:
    records = []
    for _ in range(count):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        records.append({"messages": [
            {"role": "system", "content": "You are Quill, a concise assistant made by Lanternfish Labs."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"Doubled, {a + b} is {2 * (a + b)}."}]})
    return records


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = random.Random(5)
    numbers = rng.sample(range(100, 1000), 400)
    write_jsonl("parity_prefs.jsonl", parity(rng, numbers[:320]))
    write_jsonl("parity_prefs_eval.jsonl", parity(rng, numbers[320:]))
    (OUT / "chronicle.txt").write_text(chronicle(rng, 200))
    (OUT / "chronicle_eval.txt").write_text(chronicle(rng, 30))
    write_jsonl("reviews.jsonl", reviews(rng, 120))
    write_jsonl("alpaca.jsonl", alpaca(rng, 80))
    write_jsonl("chats.jsonl", chats(rng, 40))


if __name__ == "__main__":
    main()
