"""Each optimisation's effect: lmtune at several source trees (git worktrees of successive commits) vs PEFT.

Usage: python benchmarks/ablation.py TREE [TREE ...] [--method lora] [--repeats 2] [--batch-size 4] [--seq-len 128]
       [--steps 2] [--warmup 1]

Each round runs, in fresh processes, PEFT + plain loop once and lmtune from every tree (the order rotating per
round), with this tree's `vs_peft.py --child` importing that tree's lmtune; it prints per tree the tokens/s ratio to the PEFT run of the same
round (min / median / max) and the peak memory ratio. Make the trees with `git worktree add --detach DIR COMMIT`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def child(tree: Path, spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": str(tree / "src"), "TOKENIZERS_PARALLELISM": "false"}
    harness = Path(__file__).with_name("vs_peft.py")  # this tree's harness, the tree's lmtune
    proc = subprocess.run([sys.executable, str(harness), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{tree} {spec['side']}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    r = json.loads(line.removeprefix("RESULT "))
    return {"tok_s": sum(r["tokens"]) / sum(r["times"]), "peak_mb": r["peak_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs="+", type=Path)
    p.add_argument("--method", default="lora")
    p.add_argument("--model", default=None, help="model directory (default: the packaged default model)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--label-fraction", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cpu-time", action="store_true", help="time steps by CPU time (see vs_peft.py)")
    args = p.parse_args()
    spec = {"model": args.model, "batch": args.batch_size, "seq": args.seq_len, "steps": args.steps,
            "warmup": args.warmup, "label_fraction": args.label_fraction, "threads": args.threads, "data": "fixed", "method": args.method,
            "cpu_time": args.cpu_time}
    trees = [t.resolve() for t in args.trees]
    speed: dict[Path, list[float]] = {t: [] for t in trees}
    memory: dict[Path, list[float]] = {t: [] for t in trees}
    for round_ in range(args.repeats):
        order = [None, *trees]  # None: the PEFT run
        order = order[round_ % len(order):] + order[:round_ % len(order)]
        results = {t: child(t or trees[0], {**spec, "side": "peft" if t is None else "lmtune"}) for t in order}
        print(json.dumps({str(k): v for k, v in results.items()}), flush=True)
        for t in trees:
            speed[t].append(results[t]["tok_s"] / results[None]["tok_s"])
            memory[t].append(results[t]["peak_mb"] / results[None]["peak_mb"])
    for t in trees:
        s, m = speed[t], memory[t]
        print(f"{t.name}: tokens/s vs PEFT {statistics.median(s):.2f} ({min(s):.2f}-{max(s):.2f}), "
              f"peak memory vs PEFT {statistics.median(m):.2f} ({min(m):.2f}-{max(m):.2f})")


if __name__ == "__main__":
    main()
