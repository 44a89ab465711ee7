#!/usr/bin/env python
"""Write the GRPO example's prompts (fixed seed: the same files every run).

``examples/data/arithmetic.jsonl`` / ``arithmetic_eval.jsonl``  (grpo.yaml)
    Addition and subtraction questions that ask for a final line ``Answer: <number>``, with the right
    ``answer`` as a field the exact-match reward reads. The eval questions appear nowhere in training.
Run from the repository root: python examples/make_rl_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"
ASK = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"]


def questions(rng: random.Random, count: int, seen: set) -> list[dict]:
    records = []
    while len(records) < count:
        a, b, op = rng.randint(2, 60), rng.randint(2, 40), rng.choice("+-")
        if (a, b, op) in seen:
            continue
        seen.add((a, b, op))
        question = rng.choice(ASK).format(a=a, op=op, b=b)
        records.append({"prompt": f"{question} End your reply with a line of the form 'Answer: <number>'.",
                        "answer": str(a + b if op == "+" else a - b)})
    return records


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng, seen = random.Random(11), set()
    for name, count in (("arithmetic.jsonl", 256), ("arithmetic_eval.jsonl", 16)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in questions(rng, count, seen)))


if __name__ == "__main__":
    main()
