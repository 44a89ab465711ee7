#!/usr/bin/env python
"""Write the quickstart's identity-only data: the hand-written identity conversations of
make_identity_data.py, without the base model's ordinary answers (no model needed, instant).

For training with the forgetting guard (`data.preserve.prompts=general`) instead of ordinary answers mixed in
by hand (README, "Forgetting guard"). Writes identity_only.jsonl (training; the same seeded
share of examples carries a neutral system message as in identity.jsonl) and identity_only_eval.jsonl.

Usage: python examples/make_identity_only.py [--out-dir examples/data]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_identity_data import IDENTITY_EVAL, IDENTITY_TRAIN, NEUTRAL_SYSTEM, chat, write_jsonl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-fraction", type=float, default=0.15)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with_sys = set(rng.sample(range(len(IDENTITY_TRAIN)), round(args.system_fraction * len(IDENTITY_TRAIN))))
    train = [chat(q, a, NEUTRAL_SYSTEM if i in with_sys else None) for i, (q, a) in enumerate(IDENTITY_TRAIN)]
    rng.shuffle(train)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "identity_only.jsonl", train)
    write_jsonl(args.out_dir / "identity_only_eval.jsonl", [chat(q, a) for q, a in IDENTITY_EVAL])
    print(f"wrote {len(train)} training and {len(IDENTITY_EVAL)} eval conversations to {args.out_dir}/")


if __name__ == "__main__":
    main()
