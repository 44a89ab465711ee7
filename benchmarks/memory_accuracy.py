"""Predicted vs measured peak memory of real training steps on this machine (CPU).

For each configuration a fresh subprocess records its resident memory before the model is loaded
(after imports), then loads the model, applies the method and runs training steps exactly as
`lmtune.train` does (sft_loss on fully labelled sequences, backward, clipping, AdamW, zero_grad).
Measured = the kernel's peak resident set (VmHWM) minus that baseline. glibc is told to return every
allocation above 64 KiB to the kernel on free (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0),
so freed tensors are not retained and the peak is the peak of live memory, not of the allocator's cache.
Predicted = `lmtune.memory.estimate` for the same plan (traced on fake tensors, nothing loaded).

Run: flock /work/wt/measure.lock nice python benchmarks/memory_accuracy.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A larger random Llama (~0.2B parameters), built from this config in the subprocess: no weights to load.
LARGER = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 1024,
          "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
          "num_key_value_heads": 4, "max_position_embeddings": 4096, "tie_word_embeddings": True}

DEFAULT = None  # the packaged SmolLM2-135M-Instruct
CONFIGS = [  # (model, method, batch, seq_len, gradient checkpointing)
    (DEFAULT, "full", 4, 256, False),
    (DEFAULT, "full", 1, 128, False),
    (DEFAULT, "full", 2, 512, True),
    (DEFAULT, "lora", 4, 256, False),
    (DEFAULT, "lora", 8, 512, False),
    (DEFAULT, "lora", 4, 512, True),
    (DEFAULT, {"name": "freeze", "last_n_layers": 4}, 4, 256, False),
    (DEFAULT, {"name": "freeze", "last_n_layers": 4}, 2, 1024, True),
    ("larger", "full", 2, 256, False),
    ("larger", "full", 4, 512, True),
    ("larger", "lora", 4, 512, False),
    ("larger", {"name": "lora", "target_modules": "all-linear", "r": 16}, 2, 1024, True),
    ("larger", {"name": "freeze", "last_n_layers": 2}, 8, 256, False),
]
STEPS = 2  # the first step creates AdamW's state; the second runs with it


def _child(spec: dict) -> None:
    """Run in a fresh process: baseline, load, train STEPS steps, print the peak above the baseline."""
    import torch
    import transformers

    from lmtune.models import load_weights
    from lmtune.objectives import sft_loss
    from lmtune.tuned import apply

    torch.manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    baseline = _status("VmRSS")
    if spec["model"].endswith("config.json"):
        config = transformers.AutoConfig.from_pretrained(str(Path(spec["model"]).parent))
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = load_weights(spec["model"] or None)
    tuned = apply(model, spec["method"])
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tuned.train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-5)
    b, s, vocab = spec["batch"], spec["seq_len"], model.config.vocab_size
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (b, s))
        batch = _padded_batch(ids)
        loss_sum, count, _ = sft_loss(tuned, batch)
        (loss_sum / count).backward()
        del loss_sum
        torch.nn.utils.clip_grad_norm_([p for p in tuned.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"measured": _status("VmHWM") - baseline}))


def _padded_batch(ids):
    """Every position labelled but the last of one row, which is padding, as in lmtune's padded batches
    (with padding, transformers builds a 4-D attention mask; without, SDPA runs causal with no mask)."""
    import torch

    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(spec: dict) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["measured"]


def _label(method) -> str:
    if isinstance(method, str):
        return method
    return method["name"] + "(" + ", ".join(f"{k}={v}" for k, v in method.items() if k != "name") + ")"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="the first 3 configurations only")
    p.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run")
    p.add_argument("--json", help="write the rows here as JSON")
    args = p.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    from lmtune.memory import MemoryPlan, estimate

    tmp = Path(tempfile.mkdtemp(prefix="lmtune-larger-"))
    (tmp / "config.json").write_text(json.dumps(LARGER))
    chosen = CONFIGS[:3] if args.quick else [CONFIGS[i] for i in args.only] if args.only else CONFIGS
    rows = []
    print("| model | method | batch x seq | ckpt | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|")
    for model, method, batch, seq_len, ckpt in chosen:
        name = str(tmp / "config.json") if model == "larger" else model
        started = time.perf_counter()
        predicted = estimate(MemoryPlan(model=name, method=method, batch_size=batch, seq_len=seq_len,
                                        gradient_checkpointing=ckpt)).per_device
        spent = time.perf_counter() - started
        measured = _measure({"model": name or "", "method": method, "batch": batch, "seq_len": seq_len,
                             "checkpointing": ckpt})
        row = {"model": "llama-0.2B (random)" if model == "larger" else "SmolLM2-135M", "method": _label(method),
               "batch": batch, "seq_len": seq_len, "checkpointing": ckpt, "predicted": predicted,
               "measured": measured, "error_pct": 100 * (predicted - measured) / measured,
               "estimate_seconds": spent}
        rows.append(row)
        print(f"| {row['model']} | {row['method']} | {batch} x {seq_len} | {'yes' if ckpt else 'no'} | "
              f"{predicted / 2**20:,.0f} | {measured / 2**20:,.0f} | {row['error_pct']:+.1f}% |", flush=True)
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    print(f"\nworst: {worst['error_pct']:+.1f}% ({worst['model']} {worst['method']}); "
          f"outside ±10%: {sum(abs(r['error_pct']) > 10 for r in rows)} of {len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
