"""The GPU check (run by benchmarks/gpu_check.sh on a CUDA machine): memory estimates against the GPU, then
vs_peft in bf16, on random-weight models of two real shapes (no download: the GPU machine has no network and
the default model's package is not there).

Usage: python benchmarks/gpu_check.py [--out DIR] [--skip-speed] [--skip-memory]

- Models: SmolLM2-135M's shape and a 1.1B llama (TinyLlama's shape), random weights saved in bf16, with a small
  BPE tokenizer trained in-process (its vocabulary is smaller than the model's; data tokens use part of it).
- Memory: 6 configs, each a real `lmtune train` (3 steps, every row max_length tokens, precision auto) whose
  summary.json holds the pre-flight prediction (`lmtune estimate` of the same config) and
  `torch.cuda.max_memory_allocated`; the table gives both and the error. Goal: within +-10%.
- Speed: `vs_peft.py --device cuda --precision bf16,bf16-mixed --methods lora[,qlora]`, fully and half labelled.
Writes DIR/memory.md, DIR/memory.json, DIR/vs_peft_*.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "smollm2-135m-shape": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                           "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0},
    "llama-1.1b-shape": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                         "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                         "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
MEMORY_CONFIGS = [  # (model, label, overrides)
    ("smollm2-135m-shape", "LoRA r8 all-linear, 8 x 512", ["method=lora", "method.target_modules=all-linear",
                                                           "train.batch_size=8"]),
    ("smollm2-135m-shape", "full, 4 x 512 (bf16-mixed)", ["method=full", "train.batch_size=4"]),
    ("smollm2-135m-shape", "DPO + LoRA, 4 pairs x 512", ["task=dpo", "method=lora", "train.batch_size=4"]),
    ("llama-1.1b-shape", "LoRA r16 + checkpointing, 8 x 1024", ["method=lora", "method.r=16",
                                                               "train.gradient_checkpointing=true",
                                                               "train.batch_size=8", "data.max_length=1024"]),
    ("llama-1.1b-shape", "QLoRA 4-bit, 4 x 512", ["method=lora", "model.quantization=4bit", "train.batch_size=4"]),
    ("llama-1.1b-shape", "prompt tuning, 4 x 512", ["method=prompt", "train.batch_size=4"]),
]


def build_models(directory: Path) -> dict[str, str]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    corpus = [" ".join(_words(random.Random(i), 60)) for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token="<|im_start|>")
    out = {}
    for name, shape in SHAPES.items():
        path = directory / name
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = str(path)
        del model
    return out


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "pe", "du", "ra", "zo"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def data_files(directory: Path) -> dict[str, str]:
    """Rows long enough to be cut to max_length: every position holds a token, as the estimate assumes."""
    rng = random.Random(0)
    sft, pairs = directory / "sft.jsonl", directory / "pairs.jsonl"
    sft.write_text("".join(json.dumps({"prompt": " ".join(_words(rng, 20)), "completion": " ".join(_words(rng, 900))})
                           + "\n" for _ in range(64)))
    pairs.write_text("".join(json.dumps({"prompt": " ".join(_words(rng, 20)), "chosen": " ".join(_words(rng, 900)),
                                         "rejected": " ".join(_words(rng, 900))}) + "\n" for _ in range(64)))
    return {"sft": str(sft), "dpo": str(pairs)}


def memory(models: dict[str, str], data: dict[str, str], work: Path) -> list[dict]:
    rows = []
    for i, (model, label, overrides) in enumerate(MEMORY_CONFIGS):
        if "model.quantization=4bit" in overrides and importlib.util.find_spec("bitsandbytes") is None:
            rows.append({"model": model, "config": label, "error": "bitsandbytes is not installed here"})
            continue
        task = "dpo" if "task=dpo" in overrides else "sft"
        out = work / f"run{i}"
        args = [f"model.name={models[model]}", f"data.train={data[task]}", "data.max_length=512", "data.cache=false",
                "train.steps=3", "train.save_every=null", f"output_dir={out}", *overrides]
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lmtune", "train", *args], capture_output=True, text=True)
        row = {"model": model, "config": label, "seconds": round(time.perf_counter() - started, 1)}
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        else:
            summary = json.loads((out / "summary.json").read_text())
            row.update(predicted=summary.get("predicted_peak_bytes"), measured=summary.get("measured_peak_bytes"),
                       of=summary.get("measured_peak_of"), precision=summary.get("precision"))
            if row["predicted"] and row["measured"]:
                row["error_pct"] = round(100 * (row["predicted"] - row["measured"]) / row["measured"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| model | config | precision | predicted GiB | measured GiB (cuda max allocated) | error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | | | error: {r['error']} | |")
            continue
        lines.append(f"| {r['model']} | {r['config']} | {r['precision']} | {r['predicted'] / 2**30:.2f} | "
                     f"{r['measured'] / 2**30:.2f} | {r.get('error_pct', 0):+.1f}% |")
    within = [abs(r["error_pct"]) <= 10 for r in rows if "error_pct" in r]
    lines.append(f"\n{sum(within)} of {len(within)} measured configs within +-10%.")
    return "\n".join(lines) + "\n"


def speed(models: dict[str, str], out: Path) -> None:
    methods = "lora,qlora" if importlib.util.find_spec("bitsandbytes") else "lora"
    for name, path in models.items():
        cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_peft.py"), "--model", path, "--device", "cuda",
               "--precision", "bf16,bf16-mixed", "--methods", methods, "--label-fraction", "1.0,0.5",
               "--batch-size", "8", "--seq-len", "512", "--steps", "5", "--warmup", "2", "--repeats", "2",
               "--threads", str(os.cpu_count()), "--out", str(out / f"vs_peft_{name}.md")]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = build_models(work)
        if not args.skip_memory:
            rows = memory(models, data_files(work), work)
            (out / "memory.json").write_text(json.dumps(rows, indent=2))
            table = memory_table(rows)
            (out / "memory.md").write_text(table)
            print(table, flush=True)
        if not args.skip_speed:
            speed(models, out)


if __name__ == "__main__":
    main()
