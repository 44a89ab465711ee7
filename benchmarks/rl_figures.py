#!/usr/bin/env python
"""The figures of issue 11 on the default model (SmolLM2-135M-Instruct), short runs:

1. Reward model (examples/reward.yaml): held-out pair accuracy (score(chosen) > score(rejected)) before / after.
2. GRPO (examples/grpo.yaml): mean reward of greedy completions of the held-out prompts before / after (and
   each rule reward's share), seconds per GRPO step (sampling + scoring + update; evaluations excluded).

Run under the shared lock: flock /work/wt/measure.lock nice python benchmarks/rl_figures.py [--only grpo ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lmtune.config import load_config
from lmtune.train import run

EXTRA: list[str] = []  # overrides for every run (--set), e.g. a tiny model for a dry run


def _run(config: str, *overrides: str) -> tuple[dict, list[dict], str]:
    out = tempfile.mkdtemp(prefix="lmtune-figures-")
    summary = run(load_config(config, [f"output_dir={out}", "overwrite=true", *overrides, *EXTRA]))
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, out


def reward_model(steps: int) -> dict:
    summary, rows, _ = _run("examples/reward.yaml", f"train.steps={steps}")
    evals = [r for r in rows if "eval_accuracy" in r]
    return {"held_out_pairs": 80, "steps": steps,
            "pair_accuracy": {r["step"]: round(r["eval_accuracy"], 4) for r in evals},
            "eval_loss": {r["step"]: round(r["eval_loss"], 4) for r in evals},
            "train_seconds": round(summary["train_seconds"], 1)}


def grpo(steps: int) -> dict:
    summary, rows, out = _run("examples/grpo.yaml", f"train.steps={steps}")
    evals = [r for r in rows if "eval_reward" in r]
    trained = [r for r in rows if "loss" in r]
    in_loop_evals = sum(r["eval_seconds"] for r in evals if r["step"] > 0)  # the loop's clock covers them
    keys = [k for k in evals[0] if k.startswith("eval_reward")] + ["eval_completion_length"]
    return {"held_out_prompts": 16, "steps": steps, "output_dir": out,
            "greedy_eval": {r["step"]: {k.removeprefix("eval_"): round(r[k], 4) for k in keys} for r in evals},
            "train_reward": {r["step"]: round(r["reward"], 3) for r in trained},
            "kl_last": round(trained[-1].get("kl", 0.0), 4),
            "seconds_per_step": round((summary["train_seconds"] - in_loop_evals) / steps, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=["reward", "grpo"], default=["reward", "grpo"])
    p.add_argument("--reward-steps", type=int, default=60)
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--out", default="benchmarks/results/rl_figures.json")
    args = p.parse_args()
    EXTRA.extend(args.set)
    figures = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if "reward" in args.only:
        figures["reward_model"] = reward_model(args.reward_steps)
        print(json.dumps(figures["reward_model"], indent=1))
    if "grpo" in args.only:
        figures["grpo"] = grpo(args.grpo_steps)
        print(json.dumps(figures["grpo"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
