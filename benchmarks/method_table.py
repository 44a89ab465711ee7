"""Every method on one task: trainable parameters, held-out accuracy, seconds per step.

Usage: python benchmarks/method_table.py [--methods lora,ia3,...] [--steps 60] [--out benchmarks/results/methods]

Each method trains on examples/data/topics_train.jsonl (sentence -> one of five label words) with the same
step budget, batch and data order; held-out accuracy is exact match of the first word of the greedy answer
to examples/data/topics_heldout.jsonl (held-out subjects). The untuned model is the first row. Learning
rates are per method (prompt methods need far larger rates than LoRA, as their papers report).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import lmtune
from lmtune.config import load_config
from lmtune.inference import generate
from lmtune.train import run

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
LR = {"full": 5e-5, "freeze": 2e-4, "lora": 1e-3, "ia3": 1e-2, "adapter": 1e-3, "prompt": 3e-2,
      "p-tuning": 1e-2, "prefix": 1e-2, "p-tuning-v2": 1e-2}
OPTIONS = {"freeze": {"last_n_layers": 4}}


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def accuracy(tuned, tokenizer, rows: list[dict], base: bool = False) -> float:
    hits = 0
    for r in rows:
        if base:
            with tuned.disabled():
                answer = generate(tuned, tokenizer, r["prompt"], max_new_tokens=4)
        else:
            answer = generate(tuned, tokenizer, r["prompt"], max_new_tokens=4)
        hits += first_word(answer) == r["completion"]
    return hits / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora,full,freeze")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout = [json.loads(line) for line in (DATA / "topics_heldout.jsonl").read_text().splitlines()]
    rows = []
    for name in args.methods.split(","):
        options = {f"method.{k}": v for k, v in OPTIONS.get(name, {}).items()}
        overrides = [f"data.train={DATA / 'topics_train.jsonl'}", "data.eval_split=0", f"method={name}",
                     f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={LR[name]}",
                     "train.warmup_steps=5", f"output_dir={out / name}", "overwrite=true",
                     *(f"{k}={v}" for k, v in options.items())]
        started = time.perf_counter()
        summary = run(load_config(None, overrides))
        tuned, tokenizer = lmtune.load(out / name)
        if not rows:  # the untuned model, once
            base_acc = accuracy(tuned, tokenizer, heldout, base=True) if name != "full" else None
            rows.append({"method": "untuned", "trainable": 0, "accuracy": base_acc, "s_per_step": None})
        acc = accuracy(tuned, tokenizer, heldout)
        rows.append({"method": name, "trainable": summary["trainable_params"], "total": summary["total_params"],
                     "accuracy": acc, "s_per_step": summary["train_seconds"] / summary["steps"],
                     "final_loss": summary["loss"], "wall_s": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)
        (out / "table.json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | trainable params | % of model | held-out accuracy | s / step |", "|---|---|---|---|---|"]
    for r in rows:
        pct = f"{100 * r['trainable'] / r['total']:.3f}" if r.get("total") else "0"
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        sps = "" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
        lines.append(f"| {r['method']} | {r['trainable']:,} | {pct} | {acc} | {sps} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
