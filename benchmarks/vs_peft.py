"""lmtune against PEFT + transformers, side by side: tokens/s, seconds/step, peak memory, MFU.

Usage: python benchmarks/vs_peft.py [--model PATH] [--large] [--methods lora,ia3,...] [--batch-size 4]
       [--seq-len 128] [--steps 3] [--warmup 1] [--repeats 3] [--label-fraction 1.0,0.5]
       [--precision fp32,bf16] [--device cpu|cuda] [--trl] [--dpo] [--varlen] [--threads N] [--cpu-time]
       [--out benchmarks/results/vs_peft.md]

Every measurement runs in a fresh process (`--child`), and the two sides alternate (A, B, A, B ...), so drift
of a shared machine hits both alike. In each process the same model is loaded, the same method settings
applied (PEFT's config is lmtune's own `to_peft` of the lmtune config), the same batches trained with AdamW
(same lr, weight decay, gradient clipping), `--warmup` steps untimed, then `--steps` timed.

- lmtune: `TunedModel` + `objectives.sft_loss` + AdamW through `train.train_step`, the step `lmtune train` takes.
- PEFT + plain loop: `get_peft_model`, then `model(**batch, labels=labels).loss.backward()`, clip, AdamW step.
  Methods PEFT does not have (adapter) and full / freeze: the same modules trained by that plain loop on the
  transformers model (transformers' own loss), so the difference is lmtune's step alone.
- `--trl`: LoRA also against TRL's `SFTTrainer` (PEFT inside), timed between its step callbacks; TRL's bf16 and
  gradient-checkpointing defaults turned off (`--trl` and `--dpo`), as the other sides run.
- `--dpo`: a DPO step (LoRA, beta 0.1) against TRL's `DPOTrainer` + PEFT (its default: the reference is the
  model with the adapter switched off, one more forward per step), on `--batch-size` pairs of word-salad text
  (prompt and each answer ~`--seq-len`/3 words, chat format, the same text on both sides). lmtune twice: with the
  reference forward each step (what `lmtune train` does when the run visits each pair about once), and with the
  reference log-probs cached before training (what it does when the run visits the pairs more often than there
  are pairs); each its own row.
- `--varlen`: variable-length SFT data (the example files under examples/data, tokenised by lmtune): lmtune with
  `data.packing` against PEFT + transformers `Trainer` padding each batch to its longest example; the figure is
  useful (non-pad) tokens per second.

Fixed-shape batches are `batch x seq-len` random tokens, every row full; the last `label-fraction` of each row
is the completion (labelled), the rest the prompt (label -100), as in SFT. Each fraction given (default 1.0 and
0.5) and each precision is its own row. Precision, the same on both sides: `fp32`; `bf16` (base weights loaded in
bf16; lmtune's and PEFT's adapters both stay fp32); `bf16-mixed` (fp32 weights, bf16 autocast: accelerate's for
lmtune, `torch.autocast` around the peer's forward). TRL and the variable-length rows run in fp32 only.
`--device cuda`: both sides on the GPU, steps timed after `torch.cuda.synchronize()`, memory from
`torch.cuda.max_memory_allocated` (weights included, both sides alike).

Timing: wall time by default; `--cpu-time` times each step by the process's CPU time instead, which with
`--threads 1` does not count the time other jobs on a shared machine take from it (the matmul rate alike).

Peak memory: the child's peak RSS (`ru_maxrss`) above its RSS high-water mark after imports, before the model is
loaded, with glibc told to return freed memory at once (so allocator caching does not hide or inflate a peak).
MFU: model FLOPs per step (2·T per weight forward, 2·T backward to the inputs, 2·T more for a weight that
trains; the LM head only on labelled positions; causal attention 2·B·S²·H per layer forward, x3 with
backward) over the step time, against the measured `torch.mm` rate at the model's own Linear shapes
(M = batch x seq-len rows, FLOP-weighted), in the same number of threads, in bf16 for the bf16 rows (the rate
the hardware can reach in that precision).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # lmtune's settings; the peer gets the same through the method's to_peft
    "lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    "qlora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},  # on a 4-bit NF4 base
    "ia3": {"name": "ia3"},
    "prompt": {"name": "prompt", "num_virtual_tokens": 20},
    "p-tuning": {"name": "p-tuning", "num_virtual_tokens": 20},
    "prefix": {"name": "prefix", "num_virtual_tokens": 20},
    "adapter": {"name": "adapter"},
    "freeze": {"name": "freeze", "last_n_layers": 2},
    "full": {"name": "full"},
}
VARLEN_FILES = ["alpaca.jsonl", "chats.jsonl", "identity.jsonl", "topics_train.jsonl"]
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.0, 1.0
# A larger random-weight llama (SmolLM2-360M's shape), built from its config: no download.
LARGE = {"vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
         "num_attention_heads": 15, "num_key_value_heads": 5, "max_position_embeddings": 2048,
         "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0}


# ---------------------------------------------------------------------------------------------- child side


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _fixed_batch(spec: dict, vocab: int):
    import torch

    b, s = spec["batch"], spec["seq"]
    ids = torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : s - max(1, round(s * spec["label_fraction"]))] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _varlen_examples(spec: dict, tokenizer):
    from lmtune.config import DataConfig
    from lmtune.data.pipeline import load_data

    files = [str(ROOT / "examples" / "data" / f) for f in VARLEN_FILES]
    train, _, _ = load_data(DataConfig(train=files, max_length=spec["seq"]), tokenizer, "sft", 0)
    return train


def _model_flops(model, batch: dict, trainable_head: bool | None = None) -> float:
    """Model FLOPs of one training step (see the module docstring), from the model's own Linear layers."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    tokens = batch["input_ids"].numel()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    flops = 0.0
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head:
            flops += 2 * tokens * m.weight.numel() * (3 if m.weight.requires_grad else 2)
    head_trains = head.weight.requires_grad if trainable_head is None else trainable_head
    flops += 2 * labelled * head.weight.numel() * (3 if head_trains else 2)
    cfg = model.config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    b, s = batch["input_ids"].shape
    return flops + 3 * 2 * b * s * s * hidden * layers


clock = time.perf_counter
"""What steps are timed with: wall time, or (`--cpu-time`) the process's CPU time."""


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed_loop(step, batches, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync()
        started = clock()
        step(batches[i % len(batches)])
        _sync()
        if i >= warmup:
            times.append(clock() - started)
    return times


def _on_device(module, spec: dict):
    """On the benchmark's device; a quantized base is already there (bitsandbytes places it while loading)."""
    return module if spec["method"] == "qlora" else module.to(spec["device"])


def _autocast(spec: dict):
    import torch

    return torch.autocast(spec["device"], dtype=torch.bfloat16, enabled=spec["precision"] == "bf16-mixed")


def _prepared(tuned, spec: dict):
    """(model, optimizer, scheduler, accelerator) as `lmtune train` sets them up, at the benchmark's settings."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=spec["device"] == "cpu",
                              mixed_precision="bf16" if spec["precision"] == "bf16-mixed" else "no")
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    tuned, optimizer = accelerator.prepare(tuned, optimizer)
    tuned.train()
    return tuned, optimizer, scheduler, accelerator


def _lmtune(spec: dict, model, tokenizer) -> dict:
    from lmtune.objectives import real_tokens, sft_loss
    from lmtune.train import train_step
    from lmtune.tuned import apply

    tuned, optimizer, scheduler, accelerator = _prepared(
        _on_device(apply(model, METHODS[spec["method"]], tokenizer=tokenizer), spec), spec)
    batches = _batches(spec, tokenizer, model, packed=True)
    losses = []

    def step(batch):
        losses.append(train_step(tuned, optimizer, scheduler, [batch], sft_loss, accelerator, MAX_GRAD_NORM)["loss"])

    times = _timed_loop(step, batches, spec["warmup"], spec["steps"])
    out = {"times": times, "tokens": _step_tokens(batches, spec, real_tokens), "loss": losses[-1]}
    if spec["data"] == "fixed":
        out["model_flops"] = _model_flops(model, batches[0])
    return out


def _batches(spec: dict, tokenizer, model, packed: bool) -> list[dict]:
    """The batches of every step: one fixed batch, or variable-length examples (packed for lmtune)."""
    import torch
    from torch.utils.data import DataLoader

    from lmtune.data import collate
    from lmtune.data.pack import collate_packed, pack

    if spec["data"] == "fixed":
        return [{k: v.to(spec["device"]) for k, v in _fixed_batch(spec, model.config.vocab_size).items()}]
    examples = _varlen_examples(spec, tokenizer)
    rows = pack(examples, spec["seq"]) if packed else examples
    loader = DataLoader(rows, batch_size=spec["batch"], shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=lambda r: (collate_packed if packed else collate)(r, tokenizer.pad_token_id))
    batches = list(loader)
    return batches[: spec["warmup"] + spec["steps"]]


def _step_tokens(batches: list[dict], spec: dict, count) -> list[int]:
    """Useful tokens of each timed step."""
    n = spec["warmup"] + spec["steps"]
    return [count(batches[i % len(batches)]) for i in range(spec["warmup"], n)]


def _peft_config(name: str, model):
    """PEFT's config for the benchmark's method `name`: lmtune's own `to_peft` of the lmtune settings."""
    from peft import get_peft_config

    from lmtune.methods import get_method, parse_method_config

    method = get_method(METHODS[name]["name"])
    return get_peft_config({"peft_type": method.peft_type, "task_type": "CAUSAL_LM",
                            **method.to_peft(parse_method_config(METHODS[name]), model)})


def _peer_model(spec: dict, model, tokenizer):
    """PEFT's model for the method, or (methods PEFT lacks, full, freeze) lmtune's modules on the bare model."""
    from peft import get_peft_model

    from lmtune.tuned import apply

    if spec["method"] in ("adapter", "full", "freeze"):
        return apply(model, METHODS[spec["method"]], tokenizer=tokenizer).model
    return get_peft_model(model, _peft_config(spec["method"], model))


def _peft(spec: dict, model, tokenizer) -> dict:
    import torch

    peer = _on_device(_peer_model(spec, model, tokenizer), spec)
    peer.train()
    params = [p for p in peer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    batches = _batches(spec, tokenizer, model, packed=False)
    losses = []

    def step(batch):
        with _autocast(spec):
            loss = peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    times = _timed_loop(step, batches, spec["warmup"], spec["steps"])
    return {"times": times, "tokens": _step_tokens(batches, spec, lambda b: int(b["attention_mask"].sum())),
            "loss": losses[-1]}


class _StepClock:
    """A TrainerCallback recording when each optimizer step ends."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.marks = []

            def on_train_begin(self, args, state, control, **kwargs):
                self.marks.append(clock())

            def on_step_end(self, args, state, control, **kwargs):
                self.marks.append(clock())

        return Clock()


def _trainer_args(spec: dict, work: str, cls=None, **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return cls(output_dir=work, max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=spec["batch"],
               learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
               lr_scheduler_type="constant", save_strategy="no", report_to="none", logging_steps=10_000,
               use_cpu=spec["device"] == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra)


def _clock_result(clock, spec: dict, tokens: list[int]) -> dict:
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    return {"times": steps[spec["warmup"]:], "tokens": tokens[spec["warmup"]: spec["warmup"] + spec["steps"]]}


def _trainer(spec: dict, model, tokenizer) -> dict:
    """PEFT + transformers Trainer, each batch padded to its longest example (variable-length data)."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    peer = _peer_model(spec, model, tokenizer)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in _varlen_examples(spec, tokenizer)]
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tokens: list[int] = []

    def collate(rows):
        batch = pad(rows)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    clock = _StepClock()
    with tempfile.TemporaryDirectory() as work:
        Trainer(model=peer, args=_trainer_args(spec, work), train_dataset=examples, data_collator=collate,
                callbacks=[clock]).train()
    return _clock_result(clock, spec, tokens)


# TRL's SFTConfig and DPOConfig default to bf16 autocast and gradient checkpointing (TRL 1.16); the comparison is
# at equal precision and with neither side checkpointing, as the plain loops and lmtune run.
_TRL_EQUAL = {"bf16": False, "gradient_checkpointing": False}


def _trl(spec: dict, model, tokenizer) -> dict:
    """PEFT LoRA through TRL's SFTTrainer on the fixed batch (prompt / completion split as for the others)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    batch = _fixed_batch(spec, model.config.vocab_size)
    rows = [{"input_ids": ids.tolist(), "completion_mask": (lab != -100).long().tolist()}
            for ids, lab in zip(batch["input_ids"], batch["labels"], strict=True)]
    data = Dataset.from_list(rows * (spec["warmup"] + spec["steps"]))
    peft_cfg = _peft_config(spec["method"], model)
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as work:
        args = _trainer_args(spec, work, cls=SFTConfig, max_length=spec["seq"], packing=False,
                             completion_only_loss=True, dataset_num_proc=None, **_TRL_EQUAL)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_cfg,
                   callbacks=[clock]).train()
    n = spec["batch"] * spec["seq"]
    return _clock_result(clock, spec, [n] * (spec["warmup"] + spec["steps"]))


def _dpo_pairs(spec: dict) -> list[dict]:
    """`batch` preference pairs in TRL's conversational format: seeded word salad, the same on both sides."""
    import random

    rng = random.Random(0)
    words = ("river stone light window garden paper music silver forest quiet morning yellow market bridge "
             "letter winter coffee station island pocket candle thunder orange mirror ladder velvet harbor "
             "engine meadow copper lantern falcon willow").split()
    n = max(1, spec["seq"] // 3)

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    return [{"prompt": [{"role": "user", "content": text()}], "chosen": [{"role": "assistant", "content": text()}],
             "rejected": [{"role": "assistant", "content": text()}]} for _ in range(spec["batch"])]


def _lmtune_dpo(spec: dict, model, tokenizer) -> dict:
    """lmtune's DPO step (`objectives.dpo_loss` through `train.train_step`) on lmtune's tokenisation of the pairs."""
    from lmtune.config import DataConfig
    from lmtune.data import collate_pairs
    from lmtune.data.pipeline import load_data
    from lmtune.objectives import dpo_loss, real_tokens, sequence_logps
    from lmtune.tasks import reference
    from lmtune.train import train_step
    from lmtune.tuned import apply

    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _dpo_pairs(spec)))
        pairs, _, _ = load_data(DataConfig(train=str(data), max_length=4 * spec["seq"], cache=False), tokenizer,
                                "dpo", 0)
    tuned = _on_device(apply(model, METHODS["lora"], tokenizer=tokenizer), spec)
    collate = lambda rows: collate_pairs(rows, tokenizer.pad_token_id)  # noqa: E731
    if spec.get("ref_cache"):
        reference.cache_pair_logps(tuned, pairs, collate, len(pairs), spec["device"], sequence_logps)
    tuned, optimizer, scheduler, accelerator = _prepared(tuned, spec)
    batch = {k: v.to(spec["device"]) for k, v in collate(pairs).items()}

    def step(b):
        train_step(tuned, optimizer, scheduler, [b], dpo_loss, accelerator, MAX_GRAD_NORM)

    times = _timed_loop(step, [batch], spec["warmup"], spec["steps"])
    return {"times": times, "tokens": [real_tokens(batch)] * spec["steps"]}


def _trl_dpo(spec: dict, model, tokenizer) -> dict:
    """PEFT LoRA through TRL's DPOTrainer (reference: the adapter switched off, each step), the same pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = _dpo_pairs(spec)
    tokens = sum(len(tokenizer(tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False),
                               add_special_tokens=False)["input_ids"]) for r in pairs for side in ("chosen", "rejected"))
    peft_cfg = _peft_config("lora", model)
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as work:
        args = _trainer_args(spec, work, cls=DPOConfig, beta=0.1, max_length=None, dataset_num_proc=None,
                             **_TRL_EQUAL)
        DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs * (spec["warmup"] + spec["steps"])),
                   processing_class=tokenizer, peft_config=peft_cfg, callbacks=[clock]).train()
    return _clock_result(clock, spec, [tokens] * (spec["warmup"] + spec["steps"]))


SIDES = {"lmtune": _lmtune, "peft": _peft, "trainer": _trainer, "trl": _trl, "lmtune_dpo": _lmtune_dpo,
         "trl_dpo": _trl_dpo}


def child(spec: dict) -> None:
    import torch

    global clock
    clock = time.process_time if spec.get("cpu_time") else time.perf_counter
    torch.set_num_threads(spec["threads"])
    import accelerate  # noqa: F401  every side's imports before the baseline: memory counts from here
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lmtune.train  # noqa: F401
    from lmtune.models import load_model

    if spec["side"] in ("trl", "trl_dpo"):
        import trl  # noqa: F401
    base = _rss_kb()
    torch.manual_seed(0)
    # qlora: both sides get the same bitsandbytes 4-bit NF4 base (double quantization), computing in bf16 / fp32
    quantized = {"quantization": "4bit", "double_quant": True} if spec["method"] == "qlora" else {}
    model, tokenizer = load_model(spec["model"], "bfloat16" if spec["precision"] == "bf16" else "float32",
                                  **quantized)
    if spec["side"] != "lmtune":  # the peer runs transformers' own attention, not lmtune's (lmtune.attention)
        for m in model.modules():
            if getattr(getattr(m, "config", None), "_attn_implementation", None) == "lmtune_sdpa":
                m.config._attn_implementation = "sdpa"
    result = SIDES[spec["side"]](spec, model, tokenizer)
    if spec["device"] == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = (_rss_kb() - base) / 1024
    print("RESULT " + json.dumps(result), flush=True)


def matmul_rates(spec: dict) -> None:
    """FLOP-weighted torch.mm rate at the model's Linear shapes, M = batch x seq-len rows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmtune.models import resolve_model_path

    torch.set_num_threads(spec["threads"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(spec["model"])))
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    rows = spec["batch"] * spec["seq"]
    flops = seconds = 0.0
    dtype = torch.float32 if spec["precision"] == "fp32" else torch.bfloat16
    for (k, n), count in shapes.items():
        a = torch.randn(rows, k, device=spec["device"], dtype=dtype)
        b = torch.randn(k, n, device=spec["device"], dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        now = time.process_time if spec.get("cpu_time") else time.perf_counter
        for _ in range(5):
            _sync()
            started = now()
            torch.mm(a, b)
            _sync()
            best = min(best, now() - started)
        flops += count * 2 * rows * k * n
        seconds += count * best
    print("RESULT " + json.dumps({"gflops": flops / seconds / 1e9, "shapes": len(shapes)}), flush=True)


# --------------------------------------------------------------------------------------------- parent side


def run_child(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(line.removeprefix("RESULT "))


def summarise(r: dict) -> dict:
    """tokens/s and s/step over the timed steps of one measurement."""
    seconds = sum(r["times"])
    return {"tok_s": sum(r["tokens"]) / seconds, "s_step": statistics.median(r["times"]), "peak_mb": r["peak_mb"]}


def ratios(ours: list[dict], theirs: list[dict], key: str) -> tuple[float, float, float]:
    """lmtune / peer per interleaved pair: min, median, max."""
    values = [a[key] / b[key] for a, b in zip(ours, theirs, strict=True)]
    return min(values), statistics.median(values), max(values)


def compare(spec: dict, ours_side: str, peer_side: str, repeats: int) -> dict:
    ours, theirs = [], []
    for i in range(repeats):
        pair = [(ours_side, ours), (peer_side, theirs)]
        for side, bucket in pair if i % 2 == 0 else pair[::-1]:  # A B, B A, ...: no side always goes first
            r = run_child({**spec, "side": side})
            if "error" in r:
                return {"error": f"{side}: {r['error']}"}
            bucket.append({**summarise(r), "model_flops": r.get("model_flops")})
            print(json.dumps({"method": spec["method"], "side": side, **bucket[-1]}), flush=True)
    return {"ours": ours, "theirs": theirs}


def fmt(t: tuple[float, float, float]) -> str:
    return f"{t[1]:.2f} ({t[0]:.2f}-{t[2]:.2f})"


def table_row(label: str, peer: str, c: dict, rate: float | None) -> str:
    if "error" in c:
        return f"| {label} | {peer} | error: {c['error']} | | | | | |"
    ours, theirs = c["ours"], c["theirs"]
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    mfu = ""
    if rate and ours[0].get("model_flops"):
        flops = ours[0]["model_flops"]
        mfu = f"{100 * flops / med(ours, 's_step') / rate / 1e9:.0f}% / {100 * flops / med(theirs, 's_step') / rate / 1e9:.0f}%"
    # s/step ratio is peer / lmtune, so that > 1 means lmtune is faster, like the tokens/s ratio
    step = ratios(theirs, ours, "s_step")
    return (f"| {label} | {peer} | {med(ours, 'tok_s'):.0f} / {med(theirs, 'tok_s'):.0f} | "
            f"{fmt(ratios(ours, theirs, 'tok_s'))} | {med(ours, 's_step'):.2f} / {med(theirs, 's_step'):.2f} | "
            f"{fmt(step)} | {med(ours, 'peak_mb'):.0f} / {med(theirs, 'peak_mb'):.0f} | "
            f"{fmt(ratios(ours, theirs, 'peak_mb'))} | {mfu} |")


HEADER = ["| method | peer | tokens/s lmtune / peer | tokens/s ratio | s/step lmtune / peer | speed-up (s/step) "
          "| peak MB lmtune / peer | memory ratio | MFU lmtune / peer |",
          "|---|---|---|---|---|---|---|---|---|"]


def precision_rows(label: str, at: dict, names: list[str], fractions: list[float], repeats: int) -> list[str]:
    """The table rows of one model in one precision: every method, every labelled fraction."""
    rate = _rates(at)
    print(f"{label}, {at['precision']}: torch.mm {rate:.1f} GFLOP/s", flush=True)
    lines = [f"| **{label}, {at['precision']}** (torch.mm: {rate:.0f} GFLOP/s) | | | | | | | | |"]
    for name in names:
        peer = "PEFT + loop" if name not in ("adapter", "full", "freeze") else "transformers + loop"
        for fraction in fractions:
            c = compare({**at, "method": name, "label_fraction": fraction}, "lmtune", "peft", repeats)
            lines.append(table_row(f"{name}, {fraction:.0%} labelled", peer, c, rate))
    return lines


def extra_rows(args, spec: dict, fractions: list[float]) -> list[str]:
    """The default model's rows against other peers, fp32: TRL's SFTTrainer (`--trl`, rows labelled as the last of
    `fractions`), TRL's DPOTrainer (`--dpo`), variable-length data (`--varlen`)."""
    lines = []
    if args.trl:
        fraction = fractions[-1]
        c = compare({**spec, "method": "lora", "label_fraction": fraction}, "lmtune", "trl", args.repeats)
        lines.append(table_row(f"lora, fp32, {fraction:.0%} labelled", "PEFT + TRL SFTTrainer", c, None))
    if args.dpo:
        lines.append("| **DPO, LoRA, fp32** (pairs of word salad) | | | | | | | | |")
        for cached, label in ((False, "reference forward each step"), (True, "reference log-probs cached")):
            c = compare({**spec, "method": "lora", "ref_cache": cached}, "lmtune_dpo", "trl_dpo", args.repeats)
            lines.append(table_row(f"dpo, lmtune: {label}", "PEFT + TRL DPOTrainer", c, None))
    if args.varlen:
        c = compare({**spec, "method": "lora", "data": "varlen"}, "lmtune", "trainer", args.repeats)
        lines.append("| **variable-length SFT data, fp32** (useful tokens/s) | | | | | | | | |")
        lines.append(table_row("lora, lmtune packing", "PEFT + Trainer, padding", c, None))
    return lines


def build_large(directory: Path) -> str:
    """The larger llama, random weights, saved once (with the default model's tokenizer) for every child."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmtune.models import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LARGE))
    model.save_pretrained(directory)
    load_tokenizer(None).save_pretrained(directory)
    return str(directory)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rates", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model directory (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--large", action="store_true", help="also LoRA on a random-weight llama of SmolLM2-360M's shape")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from: " + ", ".join(METHODS) + " (empty: none, e.g. with --trl / --varlen)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="interleaved lmtune / peer pairs per row")
    p.add_argument("--label-fraction", default="1.0,0.5",
                   help="labelled (completion) share of each row; comma-separated, one table row each")
    p.add_argument("--precision", default="fp32", help="comma-separated, from: fp32, bf16, bf16-mixed")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cpu-time", action="store_true",
                   help="time steps by the process's CPU time, not wall time (with --threads 1: robust to other load)")
    p.add_argument("--trl", action="store_true", help="also LoRA against TRL's SFTTrainer")
    p.add_argument("--dpo", action="store_true", help="also a LoRA DPO step against TRL's DPOTrainer + PEFT")
    p.add_argument("--varlen", action="store_true", help="also variable-length data: packing vs Trainer padding")
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.rates:
        return matmul_rates(json.loads(args.rates))
    spec = {"model": args.model, "batch": args.batch_size, "seq": args.seq_len, "steps": args.steps,
            "warmup": args.warmup, "label_fraction": 0.5, "threads": args.threads, "data": "fixed",
            "cpu_time": args.cpu_time, "device": args.device, "precision": "fp32"}
    fractions = [float(f) for f in args.label_fraction.split(",") if f]
    precisions = [x for x in args.precision.split(",") if x]
    unknown = set(precisions) - {"fp32", "bf16", "bf16-mixed"}
    if unknown:
        p.error(f"--precision: unknown {', '.join(sorted(unknown))}; choose from fp32, bf16, bf16-mixed")
    lines = [*HEADER]
    with tempfile.TemporaryDirectory() as tmp:
        models = [(Path(args.model).name if args.model else "SmolLM2-135M-Instruct", args.model)]
        if args.large:
            models.append(("llama 360M-shape (random)", build_large(Path(tmp) / "large")))
        for label, model in models:
            names = [n for n in args.methods.split(",") if n] if model == args.model else ["lora"]
            for precision in precisions:
                lines += precision_rows(label, {**spec, "model": model, "precision": precision}, names, fractions,
                                        args.repeats)
        lines += extra_rows(args, spec, fractions)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)


def _rates(spec: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--rates", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["gflops"]


if __name__ == "__main__":
    main()
