"""The forgetting guard (`data.preserve`): the base model's own answers to general prompts, mixed into training.

Fine-tuning on a narrow set (a new identity, one label task) drags the rest of the model's behaviour along: taught
"I am Quill" alone, a model answers "What is 2 + 2?" with its name. Self-distillation on the base model's own
greedy answers to varied general prompts anchors everything else while the task data carries the new behaviour
(the same trick as mixing in replay data; the targets already have a low loss, so they cost little of the task).

Before training the base model answers every prompt once (greedy, batched, at most `max_new_tokens`; an answer
cut by that limit is trimmed to its last full sentence, degenerate repetitions are dropped). The answers are
cached on disk, keyed by the prompts, the model, the tokenizer and the settings, so later runs start at once.
A seeded `held_out` part never trains: before and after training it gives the retention figures, teacher-forced
on the base answers: `agreement` (the share of answer tokens where the model's argmax is the base model's
token; the base model itself scores ~1) and `loss` (mean NLL per answer token).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmtune.config import PreserveConfig, RunConfig
from lmtune.data import Example, collate, reweight
from lmtune.data import cache as token_cache
from lmtune.data.format import IGNORE, RenderOptions, uses_chat
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError

log = logging.getLogger("lmtune")

SHIPPED = Path(__file__).with_name("general_prompts.txt")
VERSION = 1  # bump when generation or cleaning changes what an answer becomes
BATCH = 16
HOLDOUT_SEED = 0  # fixed, not train.seed: the held-out prompts stay the same across runs
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


@dataclass
class Guard:
    """What the run keeps for the after-training report."""

    held_out: list[Example]
    before: dict[str, float]
    mixed: int
    prompts: str


def read_prompts(spec: str) -> list[str]:
    """`general` (the shipped set), a .txt file (one prompt a line) or a data file whose records have `prompt`."""
    path = SHIPPED if spec == "general" else Path(spec)
    if not path.is_file():
        raise LmtuneError(f"data.preserve.prompts: file not found: {path} (or use 'general', lmtune's own set)")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for where, record in read_records(str(path)):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise LmtuneError(f"{where}: data.preserve.prompts records need a non-empty string field 'prompt'")
            prompts.append(record["prompt"].strip())
    if not prompts:
        raise LmtuneError(f"data.preserve.prompts: {path} holds no prompt")
    return list(dict.fromkeys(prompts))  # each once, in file order


def clean(text: str, finished: bool, min_chars: int = 20) -> str | None:
    """A finished answer as it is; a cut one back to its last full sentence; None when nothing usable is left."""
    text = text.strip()
    if not finished:
        ends = [m.end() for m in SENTENCE_END.finditer(text)]
        text = text[:ends[-1]] if ends else ""
        if len(text) < min_chars or text.count("```") % 2:
            return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    sentences = [s.strip() for s in SENTENCE_END.split(text) if s.strip()]
    if not text or len(lines) - len(set(lines)) >= 2 or len(sentences) - len(set(sentences)) >= 2:
        return None  # a loop ("I'm so glad ... I'm so glad ..."): not behaviour worth keeping
    return text


def _prompt_text(prompt: str, tokenizer: PreTrainedTokenizerBase, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt


def _stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool,
           max_new_tokens: int) -> list[tuple[str, bool]]:
    """(answer, finished) per text: greedy, batched with left padding (similar lengths together)."""
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[tuple[str, bool]] = [("", False)] * len(texts)
    stops, side = _stop_ids(model, tokenizer), tokenizer.padding_side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    training = model.training
    model.eval()
    try:
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, pad_token_id=pad, use_cache=True)
            for i, row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist(), strict=True):
                end = next((k for k, t in enumerate(row) if t in stops), None)
                results[i] = (tokenizer.decode(row[:end], skip_special_tokens=True), end is not None)
    finally:
        tokenizer.padding_side = side
        model.train(training)
    return results


def generate_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat: bool,
                     max_new_tokens: int) -> list[str | None]:
    """The model's cleaned greedy answers to `prompts`, as training will render them; None where one is dropped."""
    texts = [_prompt_text(p, tokenizer, chat) for p in prompts]
    return [clean(text, finished) for text, finished in greedy(model, tokenizer, texts, not chat, max_new_tokens)]


def _model_fingerprint(model: nn.Module) -> str:
    """The model's config and a sample of its weights: a changed model at the same path is a new key."""
    params = [p for p in model.parameters()]
    sample = torch.cat([p.detach().flatten()[:4096].float().cpu() for p in params[::max(1, len(params) // 8)]])
    digest = hashlib.sha256(model.config.to_json_string().encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def base_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat: bool,
                 max_new_tokens: int) -> list[str | None]:
    """The base model's answers to `prompts`, from the cache when this model, tokenizer and settings made them."""
    from lmtune.models import cache_dir

    key = hashlib.sha256(json.dumps({"version": VERSION, "prompts": prompts, "chat": chat, "new": max_new_tokens,
                                     "model": _model_fingerprint(model),
                                     "tokenizer": token_cache.tokenizer_fingerprint(tokenizer)}).encode())
    path = cache_dir() / "preserve" / f"{key.hexdigest()[:32]}.json"
    try:
        return json.loads(path.read_text())["answers"]
    except (OSError, ValueError, KeyError):
        pass  # absent or torn: generate
    began = time.process_time()
    log.info("data.preserve: the base model answers %d general prompts once (cached afterwards)", len(prompts))
    answers = generate_answers(model, tokenizer, prompts, chat, max_new_tokens)
    log.info("data.preserve: %d answers kept in %.0f CPU seconds", sum(a is not None for a in answers),
             time.process_time() - began)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # renamed into place: never a torn entry
    with os.fdopen(fd, "w") as f:
        json.dump({"prompts": prompts, "answers": answers}, f)
    os.replace(tmp, path)
    return answers


def _examples(pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, opts: RenderOptions,
              max_length: int) -> list[Example]:
    from lmtune.data import tokenize_one

    examples = []
    for i, (prompt, answer) in enumerate(pairs):
        e = tokenize_one({"prompt": prompt, "completion": answer}, tokenizer, opts, "sft", f"data.preserve[{i}]")
        if len(e.input_ids) <= max_length:  # an answer cut by truncation would teach a wrong ending
            e.anchored = True
            examples.append(e)
    return examples


@torch.no_grad()
def retention(model: nn.Module, examples: list[Example], pad_id: int) -> dict[str, float]:
    """Teacher-forced on the base answers: argmax agreement with them, and their mean NLL per token."""
    device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") \
        else next(model.parameters()).device
    training = model.training
    model.eval()
    hits = total = 0
    nll = 0.0
    for start in range(0, len(examples), BATCH):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + BATCH], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        hits += int((logits.argmax(-1) == labels)[keep].sum())
        nll += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        total += int(keep.sum())
    model.train(training)
    return {"agreement": hits / max(total, 1), "loss": nll / max(total, 1)}


def mix(cfg: RunConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, train: list) -> tuple[list, Guard | None]:
    """`train` with the base model's answers mixed in (as `data.preserve` says), and what the report needs."""
    p: PreserveConfig = cfg.data.preserve
    if p.prompts is None:
        return train, None
    if cfg.task != "sft":
        raise LmtuneError(f"data.preserve mixes answers into supervised data (task sft), not task {cfg.task}; "
                          "remove data.preserve")
    from lmtune.data.pipeline import options

    opts = options(cfg.data)
    prompts = read_prompts(p.prompts)
    answers = base_answers(model, tokenizer, prompts, uses_chat(tokenizer, opts), p.max_new_tokens)
    pairs = [(q, a) for q, a in zip(prompts, answers, strict=True) if a is not None]
    random.Random(HOLDOUT_SEED).shuffle(pairs)
    if len(pairs) - p.held_out < 1:
        raise LmtuneError(f"data.preserve.held_out={p.held_out} leaves no prompt to train on ({len(pairs)} usable "
                          f"answers from {p.prompts}); lower it or give more prompts")
    held = _examples(pairs[:p.held_out], tokenizer, opts, cfg.data.max_length)
    pool = _examples(pairs[p.held_out:], tokenizer, opts, cfg.data.max_length)
    if not pool:
        raise LmtuneError(f"data.preserve: no base answer fits in data.max_length={cfg.data.max_length}; raise it")
    wanted = round(p.fraction / (1 - p.fraction) * len(train))
    mixed = reweight(pool, wanted / len(pool), cfg.train.seed)
    if cfg.data.packing:
        from lmtune.data.pack import pack

        mixed = pack(mixed, cfg.data.max_length)
    before = retention(model, held, tokenizer.pad_token_id) if held else {}
    log.info("data.preserve: %d base-model answers mixed into %d training examples (%.0f%%); %d held out%s",
             len(mixed), len(train), 100 * p.fraction, len(held),
             f" (base model: agreement {before['agreement']:.3f}, loss {before['loss']:.3f})" if held else "")
    return train + mixed, Guard(held, before, len(mixed), p.prompts)


def report(guard: Guard | None, model: nn.Module, pad_id: int) -> dict[str, Any]:
    """The summary's `preserve` entry: retention on the held-out prompts before and after training (logged)."""
    if guard is None:
        return {}
    entry: dict[str, Any] = {"prompts": guard.prompts, "mixed_examples": guard.mixed, "held_out": len(guard.held_out)}
    if guard.held_out:
        after = retention(model, guard.held_out, pad_id)
        entry.update({f"{k}_before": v for k, v in guard.before.items()})
        entry.update({f"{k}_after": v for k, v in after.items()})
        log.info("data.preserve: on %d held-out general prompts, agreement with the base model's answers %.3f -> "
                 "%.3f, their loss %.3f -> %.3f", len(guard.held_out), guard.before["agreement"], after["agreement"],
                 guard.before["loss"], after["loss"])
    return {"preserve": entry}
