"""The default precision against fp32 on one config: speed and loss curve, each a real `lmtune train`.

Usage: python benchmarks/precision_curve.py [CONFIG.yaml] [--steps 40] [--precisions auto,fp32] [--threads 1]
       [--cpu-time] [--out benchmarks/results/precision_curve.md] [key=value ...]

Every precision is a fresh `lmtune train CONFIG train.steps=N train.precision=P` process (the other overrides
apply to all), in the order given. Speed: real (non-pad) tokens of the timed steps (all but the first) per
second, from the run's own metrics; with `--cpu-time` the run's step clock reads the process's CPU seconds (with
one torch thread, what other jobs on a shared machine take is not counted). Loss: the per-step
training loss and eval loss of each run against the first precision's, as the largest and mean absolute
difference, next to the first run's own step-to-step noise (mean |loss_t - loss_t-1|) for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
if "--cpu-time" in sys.argv:
    sys.argv.remove("--cpu-time")
    time.perf_counter = time.process_time
from lmtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(config: str, precision: str, steps: int, out: Path, threads: int, cpu_time: bool, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = ["train", config, f"train.steps={steps}", f"train.precision={precision}", f"output_dir={out}",
            "overwrite=true", "train.save_every=null", *extra, *(["--cpu-time"] if cpu_time else [])]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"precision": precision, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    timed = train[1:]
    tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in timed)
    summary = json.loads((out / "summary.json").read_text())
    return {"precision": precision, "chosen": summary.get("precision"), "tok_s": tokens / sum(r["step_seconds"]
            for r in timed), "s_step": statistics.median(r["step_seconds"] for r in timed),
            "loss": [r["loss"] for r in train], "eval": {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r},
            "peak_gib": summary.get("peak_memory_bytes", 0) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(ROOT / "examples" / "quickstart.yaml"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--precisions", default="auto,fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu-time", action="store_true")
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, precision in enumerate(args.precisions.split(",")):
            r = run(args.config, precision, args.steps, Path(tmp) / f"run{i}", args.threads, args.cpu_time, extra)
            print(json.dumps({k: v for k, v in r.items() if k not in ("loss",)}), flush=True)
            results.append(r)
    base = next((r for r in results if "error" not in r), None)
    clock = "CPU s" if args.cpu_time else "s"
    lines = [f"| precision (chosen) | tokens/s | vs {results[-1]['precision']} | {clock} / step | peak GiB | "
             f"train loss vs {base['precision'] if base else '-'}: max / mean abs diff | eval loss by step |",
             "|---|---|---|---|---|---|---|"]
    ref = results[-1]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['precision']} | error: {r['error']} | | | | | |")
            continue
        diffs = [abs(a - b) for a, b in zip(r["loss"], base["loss"], strict=False)]
        evals = ", ".join(f"{s}: {v:.3f}" for s, v in r["eval"].items())
        speed = f"{r['tok_s'] / ref['tok_s']:.2f}x" if "error" not in ref else ""
        lines.append(f"| {r['precision']} ({r['chosen']}) | {r['tok_s']:.0f} | {speed} | {r['s_step']:.2f} | "
                     f"{r['peak_gib']:.2f} | {max(diffs):.4f} / {statistics.mean(diffs):.4f} | {evals} |")
    if base:
        noise = statistics.mean(abs(a - b) for a, b in zip(base["loss"][1:], base["loss"], strict=False))
        lines.append(f"\nStep-to-step change of the {base['precision']} run's loss (mean |loss_t - loss_t-1|): "
                     f"{noise:.4f}.")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
