"""Predicted vs measured peak memory of real `lmtune train` runs, as a user sees them (CPU).

Each configuration runs `lmtune train ... train.steps=3` in a fresh process, with no allocator environment
(whatever lmtune itself does at start-up is what is measured). Measured = that process's peak resident set
(`ru_maxrss` from wait4) minus the peak resident set of a process that only imported lmtune's training
stack (`import lmtune.train`). Predicted = `lmtune.memory.estimate` of the same run config (what the
pre-flight check of `lmtune train` prints), traced on fake tensors, nothing loaded. The data fills every
sequence to `data.max_length` (long records, cut from the right), as the estimate's worst case assumes.
"For the data" = the prediction the run itself compares its peak with at the end (summary.json
`predicted_peak_bytes`): the same estimate for the run's longest batch and the token ids its data holds (a frozen
input embedding that no LM head reads is paged in only where the data looks it up).

Run: python benchmarks/memory_accuracy.py [--only N ...] [--json OUT]
     [--malloc-env]  (the old protocol: MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0)
     [--allocator system]  (LMTUNE_ALLOCATOR=system: lmtune leaves glibc's defaults alone)
     [--predict-only FILE]  (re-estimate the rows of an earlier --json, keeping their measurements)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 3
VARIED_STEPS = 40
UNTIED = "qwen2-untied"  # a random Qwen2 with an untied lm_head, built once into a temp directory
GGUF = "gguf"  # the default model's GGUF file itself: dequantised on every load
CONFIGS = [  # (label, model, task, batch, seq_len, extra overrides)
    ("full", None, "sft", 2, 128, ["method=full"]),
    ("lora", None, "sft", 4, 128, ["method=lora"]),
    ("lora r16 all-linear + ckpt", None, "sft", 8, 256,
     ["method.name=lora", "method.r=16", "method.target_modules=all-linear", "train.gradient_checkpointing=true"]),
    ("ia3", None, "sft", 2, 128, ["method=ia3"]),
    ("prompt", None, "sft", 2, 128, ["method=prompt"]),
    ("prefix", None, "sft", 2, 128, ["method=prefix"]),
    ("adapter", None, "sft", 2, 128, ["method=adapter"]),
    ("freeze(last 4) pretrain", None, "pretrain", 2, 256, ["method.name=freeze", "method.last_n_layers=4"]),
    ("full pretrain", None, "pretrain", 1, 512, ["method=full"]),
    ("lora long", None, "pretrain", 1, 2048, ["method=lora"]),
    ("lora packing", None, "sft", 2, 256, ["method=lora", "data.packing=true"]),
    ("qlora 4bit", None, "sft", 2, 128, ["method=lora", "model.quantization=4bit"]),
    ("lora 8bit", None, "sft", 1, 128, ["method=lora", "model.quantization=8bit"]),
    ("dpo lora", None, "dpo", 1, 128, ["method=lora"]),
    ("dpo full", None, "dpo", 1, 128, ["method=full"]),
    ("simpo lora", None, "simpo", 1, 128, ["method=lora"]),
    ("reward lora", None, "reward", 2, 128, ["method=lora"]),
    ("grpo lora", None, "grpo", 2, 128, ["method=lora", "grpo.group_size=4", "grpo.max_new_tokens=32",
                                        "grpo.reward=lmtune.rewards:answer_format", "data.prompt_format=plain"]),
    ("qwen2 untied lora", UNTIED, "sft", 2, 128, ["method=lora"]),
    ("qwen2 untied full", UNTIED, "sft", 2, 128, ["method=full"]),
    ("lora from GGUF", GGUF, "pretrain", 1, 64, ["method=lora"]),
    # the rows above run in fp32 (train.precision=fp32 below); these in the default, auto: bf16 / bf16-mixed on a
    # CPU or GPU with native bf16
    ("lora, auto precision", None, "sft", 4, 128, ["method=lora", "train.precision=auto"]),
    ("full, auto precision", None, "sft", 2, 128, ["method=full", "train.precision=auto"]),
    ("dpo lora, auto precision", None, "dpo", 1, 128, ["method=lora", "train.precision=auto"]),
    # 40 steps on records of varied length (every batch another shape, the longest filling data.max_length): what
    # grows over a run (bf16 kernels cached per shape) shows only in a long run of varied shapes
    ("lora all-linear, auto, 40 varied steps", None, "sft", 4, 256,
     ["method.name=lora", "method.target_modules=all-linear", "train.precision=auto", f"train.steps={VARIED_STEPS}"]),
]
WORDS = ("the a of and to in is was for on with as by at from his her they this that which one two three time "
         "people water world house river light music number story letter paper city north south early later "
         "small large green blue quickly slowly because although however between").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_data(path: Path, task: str, seq_len: int, records: int, varied: bool = False) -> None:
    """Records long enough that every sequence is cut to `seq_len` (the estimate's worst case); `varied` (sft only):
    completions of 4 to seq_len + 64 words, so that batches differ in length and the longest ones are cut."""
    rng, long = random.Random(0), seq_len + 64
    rows = []
    for _ in range(records):
        if varied:
            rows.append({"prompt": _text(rng, 4), "completion": _text(rng, rng.randint(4, long))})
        elif task == "pretrain":
            rows.append({"text": _text(rng, long)})
        elif task in ("dpo", "simpo", "reward"):
            rows.append({"prompt": _text(rng, 4), "chosen": _text(rng, long), "rejected": _text(rng, long)})
        elif task == "grpo":
            rows.append({"prompt": _text(rng, seq_len - 4)})  # one token a word, plain format: ~seq_len tokens
        else:
            rows.append({"prompt": _text(rng, 4), "completion": _text(rng, long)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def untied_config(vocab: int = 49152):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def build_untied(directory: Path) -> str:
    """A random Qwen2 (untied lm_head) with the default model's tokenizer, saved as a model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmtune.models import default_model_dir, load_tokenizer

    if (directory / "config.json").is_file():
        return str(directory)
    tokenizer = load_tokenizer(str(default_model_dir()))
    config = untied_config(len(tokenizer))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def gguf_path() -> str:
    import importlib.util

    from lmtune import models

    spec = importlib.util.find_spec(models._DEFAULT_PACKAGE)
    return str(Path(list(spec.submodule_search_locations)[0]) / models._DEFAULT_GGUF)


def overrides(row: tuple, data: Path, out: Path, model: str | None) -> list[str]:
    label, _, task, batch, seq_len, extra = row
    items = [f"data.train={data}", f"task={task}", f"train.batch_size={batch}", f"data.max_length={seq_len}",
             f"train.steps={STEPS}", "train.device=cpu", f"output_dir={out}", "overwrite=true", "resume=never",
             "data.cache=false", "force=true", "train.precision=fp32", *extra]
    return items + ([f"model.name={model}"] if model else [])


def _peak_rss(command: list[str], env: dict) -> tuple[int, str]:
    """Peak resident set of `command`'s whole process (bytes), and its stderr tail."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-2000:]
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({proc.returncode}): {tail}")
    return usage.ru_maxrss * 1024, tail


def baseline(env: dict) -> int:
    code = "import lmtune.cli as c; c._quiet_libraries(); import lmtune.train, lmtune.memory.core"
    return min(_peak_rss([sys.executable, "-c", code], env)[0] for _ in range(2))


def predict(items: list[str]) -> int:
    from lmtune.config import load_config
    from lmtune.memory import estimate
    from lmtune.memory.report import plan_from_config

    return estimate(plan_from_config(load_config(None, items))).per_device


def _env(args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LMTUNE_ALLOCATOR"):
        env.pop(key, None)
    if args.malloc_env:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if args.allocator:
        env["LMTUNE_ALLOCATOR"] = args.allocator
    return env


def measure_rows(args: argparse.Namespace, chosen: list[tuple], tmp: Path) -> list[dict]:
    env = _env(args)
    base = baseline(env)
    untied = build_untied(tmp / "qwen2-untied") if any(r[1] == UNTIED for r in chosen) else None
    rows = []
    for i, row in enumerate(chosen):
        label, model, task, batch, seq_len, _ = row
        data = tmp / f"data-{i}.jsonl"
        varied = f"train.steps={VARIED_STEPS}" in row[5]
        write_data(data, task, seq_len, records=max(8, 3 * batch + 2) if not varied else VARIED_STEPS * batch,
                   varied=varied)
        items = overrides(row, data, tmp / f"run-{i}", {UNTIED: untied, GGUF: gguf_path()}.get(model))
        started = time.perf_counter()
        peak, _ = _peak_rss([sys.executable, "-m", "lmtune.cli", "train", *items], env)
        summary = json.loads((tmp / f"run-{i}" / "summary.json").read_text())
        logged = [json.loads(x) for x in (tmp / f"run-{i}" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows.append({"label": label, "model": {UNTIED: "qwen2 untied (random)", GGUF: "SmolLM2-135M GGUF"}.get(model, "SmolLM2-135M"),
                     "task": task, "batch": batch, "seq_len": seq_len, "overrides": row[5], "items": items,
                     "measured": peak - base, "baseline": base, "process_peak": peak,
                     "summary_predicted": summary.get("predicted_peak_bytes"),
                     "summary_measured": summary.get("measured_peak_bytes"), "seconds": time.perf_counter() - started,
                     "completion_length": [r["completion_length"] for r in logged if "completion_length" in r]})
        add_prediction(rows[-1])
        print(_line(rows[-1]), flush=True)
        if args.json:  # after every row: a long run interrupted keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def add_prediction(row: dict) -> None:
    row["predicted"] = predict(row["items"])
    row["error_pct"] = 100 * (row["predicted"] - row["measured"]) / row["measured"]
    if row.get("summary_predicted"):  # the run's own prediction for its data, as its end-of-run line shows it
        row["data_error_pct"] = 100 * (row["summary_predicted"] - row["measured"]) / row["measured"]


def _line(r: dict) -> str:
    data = (f"{r['summary_predicted'] / 2**20:,.0f} | {r['data_error_pct']:+.1f}%" if "data_error_pct" in r
            else "- | -")
    return (f"| {r['label']} | {r['model']} | {r['task']} | {r['batch']} x {r['seq_len']} | "
            f"{r['predicted'] / 2**20:,.0f} | {r['measured'] / 2**20:,.0f} | {r['error_pct']:+.1f}% | {data} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run")
    p.add_argument("--json", help="write the rows here as JSON")
    p.add_argument("--malloc-env", action="store_true", help="run with MALLOC_MMAP_THRESHOLD_/TRIM_THRESHOLD_ set")
    p.add_argument("--allocator", choices=("lmtune", "system"), help="LMTUNE_ALLOCATOR for the runs")
    p.add_argument("--predict-only", help="re-estimate the rows of this JSON file (measurements kept)")
    args = p.parse_args()
    print("| config | model | task | batch x seq | estimate MiB | measured MiB | error | for the data MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    if args.predict_only:
        rows = json.loads(Path(args.predict_only).read_text())
        with tempfile.TemporaryDirectory(prefix="lmtune-memacc-") as tmp:
            untied_config().save_pretrained(tmp)  # the estimate reads the config only
            for row in rows:
                row["items"] = [f"model.name={tmp}" if i.startswith("model.name=") and "qwen2-untied" in i else i
                                for i in row["items"]]
                add_prediction(row)
                print(_line(row), flush=True)
    else:
        chosen = [CONFIGS[i] for i in args.only] if args.only else CONFIGS
        with tempfile.TemporaryDirectory(prefix="lmtune-memacc-") as tmp:
            rows = measure_rows(args, chosen, Path(tmp))
    outside = [r for r in rows if abs(r["error_pct"]) > 10]
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    print(f"\nestimate (no data): worst {worst['error_pct']:+.1f}% ({worst['label']}); outside ±10%: "
          f"{len(outside)} of {len(rows)}")
    fitted = [r for r in rows if "data_error_pct" in r]
    if fitted:
        worst = max(fitted, key=lambda r: abs(r["data_error_pct"]))
        print(f"for the run's data (end-of-run line): worst {worst['data_error_pct']:+.1f}% ({worst['label']}); "
              f"outside ±10%: {sum(abs(r['data_error_pct']) > 10 for r in fitted)} of {len(fitted)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
