#!/usr/bin/env python
"""ORPO and KTO on the default model: the held-out metric before / after, overall and per right answer.

A model that only shifts its preference between answer words, reading nothing of the prompt, can move an overall
accuracy without getting better or worse. So each evaluation is also split by the right answer's first word and
reports the mean over those groups, `balanced`: for the parity data (`examples/data/parity_prefs*.jsonl`, "Is N
even?", `yes` = even numbers, `no` = odd; 48 of the 80 held-out pairs have "Yes" right) 0.5 for any model that
ignores the number; for the topic data (`examples/data/topic_feedback*.jsonl`, five label words, each as often
right as wrong) near the overall figure. For KTO, whose own metric is the share of completions whose reward has its
label's sign, the held-out records of a pair file are also rejoined into pairs: per pair, whether the desirable
completion gained more log-probability against the base model than the undesirable one (`pair_*/reward_accuracy`,
DPO's implicit-reward accuracy) and whether the model now finds it more likely (`pair_*/preference`).

Run (one torch thread): OMP_NUM_THREADS=1 python benchmarks/orpo_kto_figures.py --only kto [--set KEY=VALUE ...]
(the configs are `examples/{orpo,kto}.yaml`; e.g. `--set data.train=examples/data/parity_prefs.jsonl
data.eval=examples/data/parity_prefs_eval.jsonl` runs KTO on the parity pairs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import string
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


def _first_word(tokenizer, ids, labels) -> str:
    text = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE],
                            skip_special_tokens=True).split()
    return text[0].strip(string.punctuation).lower() if text else ""


def _prompt(record) -> tuple:
    return tuple(record.input_ids[:record.start])


def _by_prompt(dataset) -> dict[tuple, dict[bool, object]]:
    """KTO records by prompt: {desirable: record}, a pair file's two completions under one prompt."""
    out: dict[tuple, dict[bool, object]] = {}
    for r in dataset:
        out.setdefault(_prompt(r), {})[r.desirable] = r
    return out


def _right_answers(tokenizer, dataset) -> list[str]:
    """Per eval item, the first word of its prompt's right answer (a pair's chosen; for KTO records, the
    desirable completion of the same prompt, "?" where the file holds none)."""
    if hasattr(dataset[0], "chosen"):
        return [_first_word(tokenizer, d.chosen.input_ids, d.chosen.labels) for d in dataset]
    right = {prompt: _first_word(tokenizer, rows[True].input_ids, rows[True].labels)
             for prompt, rows in _by_prompt(dataset).items() if True in rows}
    return [right.get(_prompt(r), "?") for r in dataset]


def _split_rows(tokenizer, original):
    """The task's own eval row plus `eval_{answer}/rewards/accuracy` per right answer and their mean
    `eval_balanced_accuracy`; for KTO the rejoined pairs' metrics."""
    def row(model, loader, objective, device):
        out = original(model, loader, objective, device)
        groups: dict[str, list] = {}
        for item, answer in zip(loader.dataset, _right_answers(tokenizer, loader.dataset), strict=True):
            groups.setdefault(answer, []).append(item)
        for name, items in sorted(groups.items()):
            sub = DataLoader(items, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
            out[f"eval_{name}/rewards/accuracy"] = tasks.evaluate(model, sub, objective, device)["rewards/accuracy"]
            out[f"eval_{name}/count"] = len(items)
        out["eval_balanced_accuracy"] = sum(out[f"eval_{g}/rewards/accuracy"] for g in groups) / len(groups)
        if hasattr(loader.dataset[0], "desirable"):
            out.update(_pair_metrics(model, loader.dataset, tokenizer, device))
        return out
    return row


@torch.no_grad()
def _pair_metrics(model, dataset, tokenizer, device) -> dict[str, float]:
    """KTO's eval records that come from pairs, rejoined: per pair, whether the desirable completion gained more
    log-probability against the base model than the undesirable one (`pair_reward_accuracy`) and whether the
    model now finds it more likely (`pair_preference`), per right answer and overall. Unlike the reward's sign
    against 0, both are 0.5 for a model that moves every completion alike."""
    from lmtune.objectives import sequence_logps
    from lmtune.tasks import reference
    from lmtune.tasks.kto import collate_unpaired

    pairs = [(p[True], p[False]) for p in _by_prompt(dataset).values() if len(p) == 2]
    model.eval()
    out: dict[str, list] = {}
    for i in range(0, len(pairs), 8):
        chunk = pairs[i:i + 8]
        rows = [r for pair in chunk for r in pair]
        batch = {k: v.to(device) for k, v in collate_unpaired(rows, tokenizer.pad_token_id).items()
                 if k in ("input_ids", "attention_mask", "labels")}
        logps = sequence_logps(model, batch)[0]
        with reference.reference_model(model) as ref:
            ref_logps = sequence_logps(ref, batch)[0]
        for j, (good, _) in enumerate(chunk):
            g, b = 2 * j, 2 * j + 1
            out.setdefault(_first_word(tokenizer, good.input_ids, good.labels), []).append(
                (float(logps[g] - ref_logps[g] > logps[b] - ref_logps[b]), float(logps[g] > logps[b])))
    model.train()
    row = {}
    every = [v for values in out.values() for v in values]
    for k, metric in enumerate(("reward_accuracy", "preference")):
        for name, values in sorted(out.items()):
            row[f"eval_pair_{name}/{metric}"] = sum(v[k] for v in values) / len(values)
        row[f"eval_pair_balanced/{metric}"] = sum(row[f"eval_pair_{g}/{metric}"] for g in out) / max(len(out), 1)
        row[f"eval_pair_all/{metric}"] = sum(v[k] for v in every) / max(len(every), 1)
    return row


def figures(task: str, overrides: list[str]) -> dict:
    tokenizer = load_tokenizer(None)
    registered = tasks.get_task(task)
    tasks._REGISTRY[task] = dataclasses.replace(registered, eval_row=_split_rows(tokenizer, registered.eval_row))
    out = tempfile.mkdtemp(prefix=f"lmtune-{task}-")
    cpu = time.process_time()
    summary = run(load_config(f"examples/{task}.yaml", [f"output_dir={out}", "overwrite=true", *overrides]))
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: {k.removeprefix("eval_"): round(r[k], 4) for k in r
                         if k.startswith("eval_") and not k.endswith("/count")}
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
