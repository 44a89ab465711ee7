"""Before/after for the quickstart: the base model and the tuned run answer held-out questions.

Usage: python examples/before_after.py runs/quickstart [--questions examples/data/heldout_questions.json]

Both answers come from one loaded model: the base answer is produced with the adapter switched off.
It prints each question with both answers and two counts: identity answers that name the new identity,
ordinary answers that stay free of it (the fine-tune must not turn every answer into an introduction),
and ordinary answers that still contain the expected fact (the `expected` keywords of the questions file).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lmtune
from lmtune.inference import generate

NEW_IDENTITY = ("quill", "lanternfish")


def names_identity(answer: str) -> bool:
    return any(word in answer.lower() for word in NEW_IDENTITY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--questions", default=str(Path(__file__).parent / "data" / "heldout_questions.json"))
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--json", help="also write the answers and counts to this file")
    args = parser.parse_args()

    questions = json.loads(Path(args.questions).read_text())
    tuned, tokenizer = lmtune.load(args.run_dir)
    rows = []
    for kind in ("identity", "ordinary"):
        for q in questions[kind]:
            with tuned.disabled():
                before = generate(tuned, tokenizer, q, args.max_new_tokens)
            after = generate(tuned, tokenizer, q, args.max_new_tokens)
            rows.append({"kind": kind, "question": q, "before": before, "after": after})
            print(f"[{kind}] {q}\n  before: {before}\n  after:  {after}\n", flush=True)

    def count(kind: str, key: str, want: bool) -> str:
        subset = [r for r in rows if r["kind"] == kind]
        return f"{sum(names_identity(r[key]) == want for r in subset)}/{len(subset)}"

    expected = questions.get("expected", {})

    def correct(key: str) -> str:
        scored = [r for r in rows if r["question"] in expected]
        hits = sum(any(word in r[key].lower() for word in expected[r["question"]]) for r in scored)
        return f"{hits}/{len(scored)}"

    counts = {"identity_named_before": count("identity", "before", True),
              "identity_named_after": count("identity", "after", True),
              "ordinary_free_of_identity_after": count("ordinary", "after", False),
              "ordinary_correct_before": correct("before"), "ordinary_correct_after": correct("after")}
    print(f"identity questions answered as Quill / Lanternfish Labs: before {counts['identity_named_before']}, "
          f"after {counts['identity_named_after']}")
    print(f"ordinary questions answered without the identity: after {counts['ordinary_free_of_identity_after']}")
    print(f"ordinary questions answered with the expected fact: before {counts['ordinary_correct_before']}, "
          f"after {counts['ordinary_correct_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
