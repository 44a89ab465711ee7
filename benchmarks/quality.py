"""Learning quality: lmtune vs PEFT + a plain PyTorch loop, same data, data order, budget and settings.

Usage: python benchmarks/quality.py [--tasks topics,reviews] [--methods lora,ia3,prompt,p-tuning,prefix,p-tuning-v2]
       [--seeds 0,1,2] [--steps 40] [--batch-size 8] [--threads 1] [--model DIR] [--out FILE.json]
       [--set METHOD.KEY=VALUE ...]

For every task, method and seed, both sides train the default model (or --model) from the same tokenised
examples in the same order (one seeded shuffle per seed, the DataLoader lmtune itself uses), with the same
optimizer (AdamW, the method's rate from `lmtune compare`'s table, weight decay 0), schedule (cosine, warm-up 5),
gradient clipping (1.0) and step budget:
- lmtune: `lmtune.train` (its own loop, objective and defaults), then the saved run loaded back;
- PEFT: `get_peft_model` with the PEFT config of the same method options (lmtune's `to_peft`), trained by a plain
  loop on the transformers loss.
Both are scored by one function on held-out examples: the share whose answer tokens (the completion, end-of-turn
token excluded) are all the argmax of the teacher-forced logits, which is greedy decoding's answer (prefix methods
included: PEFT's prefix `generate` is unreliable, its forward is not). Printed: mean +- std over seeds per task and
method; the JSON holds every run. `--set lora.method.r=16`, `prefix.train.lr=3e-3` change one method on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # train file, held-out file (None: the last `held_out` records of the train file)
    "topics": (ROOT / "examples/data/topics_train.jsonl", ROOT / "examples/data/topics_heldout.jsonl"),
    "reviews": (ROOT / "examples/data/reviews.jsonl", None),
}
HELD_OUT = 40
METHODS = {"lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
           "ia3": {"name": "ia3"}, "prompt": {"name": "prompt"}, "p-tuning": {"name": "p-tuning"},
           "prefix": {"name": "prefix"}, "p-tuning-v2": {"name": "p-tuning-v2"}}
WARMUP, CLIP, MAX_LENGTH = 5, 1.0, 256


def split_task(task: str, work: Path) -> tuple[str, str]:
    train, held = TASKS[task]
    if held is not None:
        return str(train), str(held)
    lines = train.read_text().splitlines()
    (work / f"{task}_train.jsonl").write_text("\n".join(lines[:-HELD_OUT]) + "\n")
    (work / f"{task}_held.jsonl").write_text("\n".join(lines[-HELD_OUT:]) + "\n")
    return str(work / f"{task}_train.jsonl"), str(work / f"{task}_held.jsonl")


@torch.no_grad()
def accuracy(model, examples: list, tokenizer) -> float:
    """Share of examples whose answer tokens (labels, special tokens excluded) are all the teacher-forced argmax."""
    from lmtune.data import collate

    special = torch.tensor(sorted(tokenizer.all_special_ids))
    model.eval()
    right = 0
    for start in range(0, len(examples), 16):
        b = collate(examples[start:start + 16], tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = logits[:, -b["input_ids"].shape[1]:]  # PEFT's prompt tuning returns the virtual positions too
        labels = b["labels"][:, 1:]
        scored = (labels != -100) & ~torch.isin(labels, special)
        ok = (logits[:, :-1].argmax(-1) == labels) | ~scored
        right += int(ok.all(dim=1).sum())
    return right / len(examples)


def lr_of(method: str, overrides: dict) -> float:
    from lmtune.compare import METHOD_DEFAULTS

    return float(overrides.get("train.lr", METHOD_DEFAULTS[method]["train.lr"]))


def run_lmtune(method: dict, lr: float, train: str, held: list, seed: int, args, work: Path) -> float:
    import lmtune
    from lmtune.config import load_config
    from lmtune.train import run

    out = work / f"run-{method['name']}-{seed}"
    opts = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in method.items() if k != "name"]
    cfg = load_config(None, [f"data.train={train}", f"output_dir={out}", "train.device=cpu",
                             f"method={method['name']}", *[f"method.{o}" for o in opts], f"train.steps={args.steps}",
                             f"train.batch_size={args.batch_size}", f"train.lr={lr}", f"train.warmup_steps={WARMUP}",
                             f"train.seed={seed}", f"train.max_grad_norm={CLIP}", "train.save_every=null",
                             f"data.max_length={MAX_LENGTH}", "train.weight_decay=0.0"]
                      + ([f"model.name={args.model}"] if args.model else []))
    run(cfg)
    tuned, tokenizer = lmtune.load(out)
    return accuracy(tuned, held, tokenizer)


def run_peft(method: dict, lr: float, train_examples: list, held: list, seed: int, args) -> float:
    from peft import get_peft_config, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    import lmtune
    from lmtune.data import collate
    from lmtune.methods import get_method, parse_method_config

    model, tokenizer = lmtune.load_model(args.model)
    torch.manual_seed(seed)
    spec, cfg = get_method(method["name"]), parse_method_config(method)
    peer = get_peft_model(model, get_peft_config({"peft_type": spec.peft_type, "task_type": "CAUSAL_LM",
                                                  **spec.to_peft(cfg, model)}))
    params = [p for p in peer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP, args.steps)
    # lmtune's own loader: the same examples in the same seeded order.
    loader = DataLoader(train_examples, batch_size=args.batch_size, shuffle=True,
                        collate_fn=lambda rows: collate(rows, tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(seed))
    batches = (b for _ in iter(int, 1) for b in loader)
    peer.train()
    for _ in range(args.steps):
        b = next(batches)
        peer(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return accuracy(peer, held, tokenizer)


def parse_sets(values: list[str]) -> dict[str, dict]:
    sets: dict[str, dict] = {}
    for item in values:
        key, _, value = item.partition("=")
        method, _, rest = key.partition(".")
        sets.setdefault(method, {})[rest] = json.loads(value) if value[:1] in "[{" else value
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="topics,reviews")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--sides", default="lmtune,peft")
    p.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE, e.g. lora.train.lr=2e-4")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/quality.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lmtune
    from lmtune.data import tokenize_records

    sets, results = parse_sets(args.set), []
    _, tokenizer = lmtune.load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for task in args.tasks.split(","):
            train, held_path = split_task(task, work)
            train_examples = tokenize_records(train, tokenizer, MAX_LENGTH)[0]
            held = tokenize_records(held_path, tokenizer, MAX_LENGTH)[0]
            for name in args.methods.split(","):
                extra = sets.get(name, {})
                method = {**METHODS[name], **{k.removeprefix("method."): v for k, v in extra.items()
                                              if k.startswith("method.")}}
                lr = lr_of(name, extra)
                for seed in (int(s) for s in args.seeds.split(",")):
                    for side in args.sides.split(","):
                        acc = run_lmtune(method, lr, train, held, seed, args, work) if side == "lmtune" else \
                            run_peft(method, lr, train_examples, held, seed, args)
                        results.append({"task": task, "method": name, "side": side, "seed": seed, "lr": lr,
                                        "steps": args.steps, "batch_size": args.batch_size, "accuracy": acc})
                        print(json.dumps(results[-1]), flush=True)
                        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    print("| task | method | lr | lmtune accuracy (mean +- std) | PEFT + plain loop |")
    print("|---|---|---|---|---|")
    keys = dict.fromkeys((r["task"], r["method"], r["lr"]) for r in results)
    for task, method, lr in keys:
        cells = []
        for side in ("lmtune", "peft"):
            acc = [r["accuracy"] for r in results if (r["task"], r["method"], r["lr"], r["side"]) ==
                   (task, method, lr, side)]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            cells.append(f"{statistics.mean(acc):.2f} +- {std:.2f} (n={len(acc)})" if acc else "")
        print(f"| {task} | {method} | {lr:g} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    sys.exit(main())
