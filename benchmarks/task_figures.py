#!/usr/bin/env python
"""The figures of issue 5 on the default model (SmolLM2-135M-Instruct), short runs:

1. DPO (examples/dpo.yaml): held-out preference accuracy (log p(chosen) > log p(rejected)) before / after.
2. Continued pre-training (examples/pretrain.yaml): held-out perplexity before / after.
3. Packing: useful (non-pad) tokens per second with and without data.packing on variable-length chat data.

Run under the shared lock: flock /work/wt/measure.lock nice python benchmarks/task_figures.py [--only dpo ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lmtune.config import load_config
from lmtune.train import run

EXTRA: list[str] = []  # overrides for every run (--set), e.g. a tiny model for a dry run


def _run(config: str | None, *overrides: str) -> tuple[dict, list[dict]]:
    out = tempfile.mkdtemp(prefix="lmtune-figures-")
    summary = run(load_config(config, [f"output_dir={out}", "overwrite=true", *overrides, *EXTRA]))
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def dpo(steps: int) -> dict:
    summary, rows = _run("examples/dpo.yaml", f"train.steps={steps}", "train.eval_every=20")
    evals = [r for r in rows if "eval_logp_accuracy" in r]
    return {"held_out_pairs": 80, "steps": steps,
            "logp_accuracy": {r["step"]: round(r["eval_logp_accuracy"], 4) for r in evals},
            "reward_accuracy": {r["step"]: round(r["eval_rewards/accuracy"], 4) for r in evals},
            "train_seconds": round(summary["train_seconds"], 1)}


def pretrain(steps: int) -> dict:
    summary, rows = _run("examples/pretrain.yaml", f"train.steps={steps}")
    evals = [r for r in rows if "eval_perplexity" in r]
    return {"steps": steps, "perplexity": {r["step"]: round(r["eval_perplexity"], 3) for r in evals},
            "train_seconds": round(summary["train_seconds"], 1)}


def packing(steps: int) -> dict:
    result = {}
    for packed in (False, True):
        summary, rows = _run(None, "data.train=examples/data/identity.jsonl", "data.max_length=512",
                             f"data.packing={str(packed).lower()}", "train.batch_size=4", f"train.steps={steps}",
                             "method.target_modules=all-linear", "data.cache=true")
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first step warms up
        result["packed" if packed else "padded"] = {"examples": summary["data"]["examples"],
                                                    "useful_tokens_per_s": round(statistics.median(speeds), 1)}
    result["gain"] = round(result["packed"]["useful_tokens_per_s"] / result["padded"]["useful_tokens_per_s"], 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=["dpo", "pretrain", "packing"])
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--pretrain-steps", type=int, default=20)
    p.add_argument("--packing-steps", type=int, default=6)
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run (a dry run on a tiny model)")
    args = p.parse_args()
    EXTRA.extend(args.set)
    jobs = {"dpo": lambda: dpo(args.dpo_steps), "pretrain": lambda: pretrain(args.pretrain_steps),
            "packing": lambda: packing(args.packing_steps)}
    for name in args.only:
        print(json.dumps({name: jobs[name]()}), flush=True)


if __name__ == "__main__":
    main()
