"""`lmtune estimate`: a run's YAML (the same file `lmtune train` reads) and/or flags -> the estimate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

# Kept free of torch / transformers imports: `lmtune --help` builds this parser.
_CHOICES = {"precision": ("fp32", "bf16", "fp16", "bf16-mixed", "fp16-mixed"),
            "optimizer": ("adamw", "adamw-8bit", "sgd"), "quantization": ("none", "8bit", "4bit"),
            "device": ("cpu", "cuda")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML run config, as for lmtune train (optional)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. method.r=16")
    p.add_argument("--model", help="model directory, config.json, GGUF file or hub id (default: SmolLM2-135M)")
    p.add_argument("--method", help="method name (options as overrides: method.r=16)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch per device (train.batch_size)")
    p.add_argument("--seq-len", type=int, help="padded tokens per sequence (data.max_length)")
    p.add_argument("--labelled-fraction", type=float,
                   help="share of positions that carry loss (default 1.0, the worst case)")
    p.add_argument("--precision", choices=_CHOICES["precision"],
                   help="fp32, pure bf16/fp16, or mixed (fp32 master weights + 16-bit autocast); default: the "
                   "config's train.precision (auto: bf16 where the device multiplies bf16 natively)")
    p.add_argument("--optimizer", choices=_CHOICES["optimizer"])
    p.add_argument("--quantization", choices=_CHOICES["quantization"], help="8/4-bit frozen base weights")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--packing", action="store_true", default=None)
    p.add_argument("--task", help="the run's task (as task=...): sft / pretrain; dpo (pairs + reference), simpo "
                   "and orpo (pairs), kto (completions + mismatched rows, reference), reward (pairs, scalar head), "
                   "grpo (grpo.group_size completions of up to grpo.max_new_tokens per prompt, reference)")
    p.add_argument("--devices", type=int, help="data-parallel devices")
    p.add_argument("--sharding", choices=("none", "fsdp"), help="fsdp: per-device figures under FSDP full sharding")
    p.add_argument("--device", choices=_CHOICES["device"], help="where it runs (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _run_config(args: argparse.Namespace):
    from lmtune.config import apply_override, load_config, validate

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not os.path.exists(config):
        config, overrides = None, [config, *overrides]
    if args.method:
        overrides.insert(0, f"method.name={args.method}")
    if args.quantization:  # through the config too: train.precision=auto depends on it
        overrides.insert(0, f"model.quantization={args.quantization}")
    if args.task:  # through the config, so the task registry names the step it traces
        overrides.insert(0, f"task={args.task}")
    if config is not None:
        return load_config(config, overrides)
    raw: dict[str, Any] = {"data": {"train": "(not read by lmtune estimate)"}}
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw)


def run(args: argparse.Namespace) -> None:
    from lmtune.memory import estimate
    from lmtune.memory.report import format_estimate, plan_from_config

    cfg = _run_config(args)
    plan = plan_from_config(cfg)
    flags: dict[str, Any] = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                             "labelled_fraction": args.labelled_fraction, "precision": args.precision,
                             "optimizer": args.optimizer, "quantization": args.quantization,
                             "gradient_checkpointing": args.gradient_checkpointing, "packing": args.packing,
                             "devices": args.devices, "device": args.device, "sharding": args.sharding}
    plan = dataclasses.replace(plan, **{k: v for k, v in flags.items() if v is not None})
    est = estimate(plan)
    print(json.dumps(est.as_dict(), indent=2) if args.json else format_estimate(est))
