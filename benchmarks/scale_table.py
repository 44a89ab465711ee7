"""Peak memory and step time of LoRA on the default model by precision, base quantization and checkpointing.

Usage: python benchmarks/scale_table.py [--steps 4] [--batch-size 4] [--seq-len 256] [--threads N] [--cpu-time]
       [--out benchmarks/results/scale.md]

Every configuration is a real `lmtune train` run (batch x seq-len tokens: long texts cut to seq-len) in a fresh
process. Memory is the training run's peak resident memory above the process's own before the model is loaded: the
RSS high-water mark is reset once the model is loaded (loading's transient fp32 copies are not training memory), and
glibc is told to return freed memory at once, so the peak is not hidden by allocator caching. Step time is the
median over the steps after the first. Ratios are against fp32 LoRA measured in the same invocation. When other work
shares the machine, `--threads 1 --cpu-time` keeps the step times steady: one torch thread (intra-op threads wait for
each other, so one starved thread slows every step many times over), timed in CPU seconds of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [  # (label, overrides)
    ("fp32", ["train.precision=fp32"]),  # explicit: the default (auto) is bf16 on a CPU with native bf16
    ("bf16-mixed", ["train.precision=bf16-mixed"]),
    ("bf16", ["train.precision=bf16"]),
    ("8-bit base", ["model.quantization=8bit"]),
    ("4-bit NF4 base (QLoRA)", ["model.quantization=4bit", "model.double_quant=true"]),
]
CHILD = """
import re, sys, time
if "--cpu-time" in sys.argv:  # the loop's step clock reads this process's CPU seconds instead of wall seconds
    sys.argv.remove("--cpu-time")
    time.perf_counter = time.process_time
import lmtune.train as train
from lmtune.config import load_config

def kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

base = kb("VmRSS")
loop = train._loop

def measured_loop(*args, **kwargs):
    # loading (fp32 weights read, then cast or quantized) has its own peak; reset the high-water mark so the
    # figure is the training run's: weights, adapter, gradients, optimizer states, activations
    open("/proc/self/clear_refs", "w").write("5")
    result = loop(*args, **kwargs)
    print("PEAK_KB", kb("VmHWM") - base)
    return result

train._loop = measured_loop
train.run(load_config(None, sys.argv[1:]))
"""


def text_file(directory: Path) -> Path:
    rng = random.Random(0)
    words = "the model learns a small task from data and keeps what it knew before training starts".split()
    path = directory / "long_texts.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n"
                            for _ in range(32)))
    return path


def measure(overrides: list[str], steps: int, batch: int, seq: int, work: Path, name: str, threads: int,
            cpu_time: bool) -> dict:
    out = work / name
    args = [f"data.train={text_file(work)}", f"data.max_length={seq}", "method=lora", "method.target_modules=all-linear",
            f"train.steps={steps}", f"train.batch_size={batch}", "train.lr=1e-4", "train.device=cpu",
            f"output_dir={out}", "overwrite=true", *overrides]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", CHILD, *args, *(["--cpu-time"] if cpu_time else [])], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    peak_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    seconds = [batch * seq / r["tokens_per_s"] for r in rows[1:]]  # every row is full: long texts cut to seq
    return {"peak_gb": peak_kb / 2**20, "s_per_step": statistics.median(seconds), "loss": rows[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--cpu-time", action="store_true", help="time steps in CPU seconds of the process, not wall seconds")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale.md"))
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in CONFIGS:
            for checkpointing in (False, True):
                extra = ["train.gradient_checkpointing=true"] if checkpointing else []
                r = measure(overrides + extra, args.steps, args.batch_size, args.seq_len, Path(tmp), f"run{len(results)}",
                            args.threads, args.cpu_time)
                r.update(config=label, checkpointing=checkpointing)
                results.append(r)
                print(json.dumps(r), flush=True)
    base = next(r for r in results if r["config"] == "fp32" and not r["checkpointing"])
    clock = "CPU s / step" if args.cpu_time else "s / step"
    lines = [f"| LoRA on | grad. checkpointing | training peak memory (GB) | vs fp32 | {clock} | vs fp32 |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {'yes' if r['checkpointing'] else 'no'} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['config']} | {'yes' if r['checkpointing'] else 'no'} | {r['peak_gb']:.2f} | "
                     f"{r['peak_gb'] / base['peak_gb']:.2f}x | {r['s_per_step']:.2f} | "
                     f"{r['s_per_step'] / base['s_per_step']:.2f}x |")
    table = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
