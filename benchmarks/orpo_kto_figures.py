#!/usr/bin/env python
"""ORPO and KTO on the default model: the held-out metric before / after, overall and per class.

The parity data (`examples/data/parity_prefs*.jsonl`, "Is N even?") is not balanced: 48 of the 80 held-out pairs
have "Yes" as the right answer (153 of the 320 training pairs). A model that only shifts its Yes / No prior,
learning no parity, moves the overall preference accuracy between 0.40 and 0.60 without getting better or worse.
So each evaluation here is also split by the right answer (`yes` = even numbers, `no` = odd): a model that learns
parity gains on both; one that learns a prior gains on one class what it loses on the other. `balanced` is the
mean of the two (0.5 for any model that ignores the number).

Run (one torch thread): OMP_NUM_THREADS=1 python benchmarks/orpo_kto_figures.py --only orpo [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lmtune import tasks
from lmtune.config import load_config
from lmtune.data.format import IGNORE
from lmtune.models import load_tokenizer
from lmtune.train import run


def _answer_says_yes(tokenizer, item) -> bool:
    """Whether the right answer of a pair (or the completion of a KTO record) starts with "Yes"."""
    ids, labels = (item.chosen.input_ids, item.chosen.labels) if hasattr(item, "chosen") else (item.input_ids,
                                                                                                  item.labels)
    says_yes = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE]).lstrip()
    says_yes = says_yes.startswith("Yes")
    return says_yes if hasattr(item, "chosen") or item.desirable else not says_yes


def _split_rows(tokenizer, original):
    """The task's own eval row plus `eval_{yes,no}/rewards/accuracy` and their mean `eval_balanced_accuracy`."""
    def row(model, loader, objective, device):
        out = original(model, loader, objective, device)
        groups: dict[str, list] = {"yes": [], "no": []}
        for item in loader.dataset:
            groups["yes" if _answer_says_yes(tokenizer, item) else "no"].append(item)
        for name, items in groups.items():
            sub = DataLoader(items, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
            out[f"eval_{name}/rewards/accuracy"] = tasks.evaluate(model, sub, objective, device)["rewards/accuracy"]
            out[f"eval_{name}/count"] = len(items)
        out["eval_balanced_accuracy"] = (out["eval_yes/rewards/accuracy"] + out["eval_no/rewards/accuracy"]) / 2
        if hasattr(loader.dataset[0], "desirable"):
            out.update(_pair_metrics(model, loader.dataset, tokenizer.pad_token_id, device))
        return out
    return row


@torch.no_grad()
def _pair_metrics(model, dataset, pad_id: int, device) -> dict[str, float]:
    """KTO's eval records that come from pairs, rejoined: per pair, whether the desirable completion gained more
    log-probability against the base model than the undesirable one (`pair_reward_accuracy`, DPO's implicit
    reward accuracy) and whether the model now finds it more likely (`pair_preference`), split by the right
    answer. Unlike the reward's sign against 0, both are 0.5 for a model that moves every completion alike."""
    from lmtune.objectives import sequence_logps
    from lmtune.tasks import reference
    from lmtune.tasks.kto import collate_unpaired

    by_prompt: dict[tuple, dict[bool, object]] = {}
    for row in dataset:
        by_prompt.setdefault(tuple(row.input_ids[:row.start]), {})[row.desirable] = row
    pairs = [(p[True], p[False]) for p in by_prompt.values() if len(p) == 2]
    model.eval()
    out: dict[str, list] = {"yes": [], "no": []}
    for i in range(0, len(pairs), 8):
        chunk = pairs[i:i + 8]
        rows = [r for pair in chunk for r in pair]
        batch = {k: v.to(device) for k, v in collate_unpaired(rows, pad_id).items()
                 if k in ("input_ids", "attention_mask", "labels")}
        logps = sequence_logps(model, batch)[0]
        with reference.reference_model(model) as ref:
            ref_logps = sequence_logps(ref, batch)[0]
        for j, (good, _) in enumerate(chunk):
            g, b = 2 * j, 2 * j + 1
            says_yes = _tokenizer.decode([t for t, lab in zip(good.input_ids, good.labels, strict=True) if lab != IGNORE])
            out["yes" if says_yes.lstrip().startswith("Yes") else "no"].append(
                (float(logps[g] - ref_logps[g] > logps[b] - ref_logps[b]), float(logps[g] > logps[b])))
    model.train()
    row = {}
    for name, values in out.items():
        row[f"eval_pair_{name}/reward_accuracy"] = sum(v[0] for v in values) / max(len(values), 1)
        row[f"eval_pair_{name}/preference"] = sum(v[1] for v in values) / max(len(values), 1)
    for metric in ("reward_accuracy", "preference"):
        row[f"eval_pair_balanced/{metric}"] = (row[f"eval_pair_yes/{metric}"] + row[f"eval_pair_no/{metric}"]) / 2
    return row


_tokenizer = None


def figures(task: str, overrides: list[str]) -> dict:
    global _tokenizer
    tokenizer = _tokenizer = load_tokenizer(None)
    registered = tasks.get_task(task)
    tasks._REGISTRY[task] = dataclasses.replace(registered, eval_row=_split_rows(tokenizer, registered.eval_row))
    out = tempfile.mkdtemp(prefix=f"lmtune-{task}-")
    cpu = time.process_time()
    summary = run(load_config(f"examples/{task}.yaml", [f"output_dir={out}", "overwrite=true", *overrides]))
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    keys = ("eval_loss", "eval_rewards/accuracy", "eval_yes/rewards/accuracy", "eval_no/rewards/accuracy",
            "eval_balanced_accuracy", "eval_rewards/margin", "eval_log_odds_ratio", "eval_rewards/signed", "eval_kl",
            *(f"eval_pair_{c}/{m}" for c in ("yes", "no", "balanced") for m in ("reward_accuracy", "preference")))
    evals = {r["step"]: {k.removeprefix("eval_"): round(r[k], 4) for k in keys if k in r}
             for r in rows if "eval_loss" in r}
    return {"task": task, "overrides": overrides, "evals": evals, "eval_examples": summary["eval_examples"],
            "train_seconds": round(summary["train_seconds"], 1), "cpu_seconds": round(time.process_time() - cpu, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=["orpo", "kto"])
    p.add_argument("--set", nargs="*", default=[], help="overrides for the runs, e.g. train.steps=15")
    args = p.parse_args()
    torch.set_num_threads(1)
    for task in args.only:
        print(json.dumps(figures(task, args.set)), flush=True)


if __name__ == "__main__":
    main()
