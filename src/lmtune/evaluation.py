"""`lmtune eval`: score a run (or a base model) on a data file.

Which metrics apply follows from the records' fields, as in training:
- text (and conversations): `loss` (mean NLL per learned token) and `perplexity` = exp(loss);
- one prompt, one answer (prompt/completion, instruction/output, text/label): the same, plus `exact_match`
  and `accuracy` of the greedy answer to each prompt, after normalisation;
- prompt/chosen/rejected: `preference_accuracy`, the fraction of pairs whose chosen answer has the higher
  summed log-probability (`objectives.sequence_logps`).
The records are rendered and tokenised by the data pipeline with the run's own data settings (prompt format,
template, max length), so a run is scored on exactly what it was trained to see.
"""

from __future__ import annotations

import functools
import math
import re
import string
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lmtune.config import DataConfig, DataSource, load_config
from lmtune.data import collate, collate_pairs
from lmtune.data.format import PREFERENCE_KEYS, detect, prompt_and_answer, uses_chat
from lmtune.data.pipeline import options, read_source, use_chat_template
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError
from lmtune.inference import generate
from lmtune.objectives import sequence_logps, sft_loss
from lmtune.tuned import TunedModel

METRICS = ("loss", "perplexity", "accuracy", "exact_match", "preference_accuracy")
KIND_METRICS = {
    "text": ("loss", "perplexity"),
    "answer": ("loss", "perplexity", "exact_match", "accuracy"),
    "preference": ("preference_accuracy",),
}
NORMALIZERS = ("case", "punctuation", "whitespace", "articles")
DEFAULT_NORMALIZE = ("case", "punctuation", "whitespace")
EXTRA_NEW_TOKENS = 8  # generated beyond the reference's length when --max-new-tokens is not given
SHOWN_MISSES = 5


def data_kind(records: list[tuple[str, dict]], path: str | Path) -> str:
    """`text`, `answer` or `preference`: what the file's records hold (all must agree)."""
    kinds = set()
    for where, record in records:
        keys = detect(record, where)
        kinds.add("preference" if keys == PREFERENCE_KEYS else "text" if keys in (("text",), ("messages",))
                  else "answer")
    if len(kinds) > 1:
        raise LmtuneError(f"{path}: records of different kinds ({', '.join(sorted(kinds))})"
                          "; evaluate each kind from its own file")
    return kinds.pop()


def choose_metrics(kind: str, requested: list[str] | None) -> list[str]:
    """The requested metrics, checked against what the data can give; by default all it can give."""
    if not requested:
        return list(KIND_METRICS[kind])
    for name in requested:
        if name not in METRICS:
            raise LmtuneError(f"unknown metric '{name}'; choose from {', '.join(METRICS)}")
        if name not in KIND_METRICS[kind]:
            raise LmtuneError(f"metric '{name}' does not apply to {kind} records; they give "
                              f"{', '.join(KIND_METRICS[kind])}")
    return list(dict.fromkeys(requested))


def parse_normalize(value: str | None) -> tuple[str, ...]:
    """`--normalize case,punctuation` -> ('case', 'punctuation'); `none` -> (); empty -> the default."""
    if value is None:
        return DEFAULT_NORMALIZE
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if names == ("none",):
        return ()
    for name in names:
        if name not in NORMALIZERS:
            raise LmtuneError(f"unknown normalisation '{name}'; choose from {', '.join(NORMALIZERS)} or none")
    return names


def normalize(text: str, steps: tuple[str, ...]) -> str:
    """The answer as compared: lower-cased, without punctuation / English articles, whitespace collapsed."""
    text = text.strip()
    if "case" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if "articles" in steps:
        text = re.sub(r"\b(a|an|the)\b", " ", text, flags=re.IGNORECASE)
    if "whitespace" in steps:
        text = " ".join(text.split())
    return text


def starts_with_answer(generated: str, answer: str) -> bool:
    """The answer comes first, whole (what follows it is ignored): `food. It is about` for `food`."""
    if not answer:
        return not generated
    return generated.startswith(answer) and (len(generated) == len(answer) or not generated[len(answer)].isalnum())


def data_settings(run_dir: str | Path | None) -> DataConfig:
    """The run's data settings (format, template, max length) from its config.yaml; defaults otherwise."""
    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    if saved is not None and saved.is_file():
        # The run saved its tokenizer with data.chat_template already in it.
        return load_config(saved).data.model_copy(update={"chat_template": None})
    return DataConfig.model_construct(train=[])  # settings only: no training data


def on_device(tuned: TunedModel) -> TunedModel:
    """Scoring runs on the GPU when there is one."""
    return tuned.to("cuda") if torch.cuda.is_available() else tuned


@torch.no_grad()
def mean_loss(tuned: TunedModel, examples: list, pad_id: int, batch_size: int, device: str) -> float:
    """Mean NLL per learned token over every example."""
    total, count = 0.0, 0
    for batch in DataLoader(examples, batch_size=batch_size, collate_fn=functools.partial(collate, pad_id=pad_id)):
        loss_sum, n, _ = sft_loss(tuned, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + int(n)
    return total / max(count, 1)


@torch.no_grad()
def preference_accuracy(tuned: TunedModel, pairs: list, pad_id: int, batch_size: int, device: str) -> float:
    """Fraction of pairs whose chosen answer has a higher summed log-probability than the rejected one."""
    hits = 0
    for batch in DataLoader(pairs, batch_size=batch_size, collate_fn=functools.partial(collate_pairs, pad_id=pad_id)):
        chosen, rejected = sequence_logps(tuned, {k: v.to(device) for k, v in batch.items()})[0].chunk(2)
        hits += int((chosen > rejected).sum())
    return hits / len(pairs)


def generation_scores(tuned: TunedModel, tokenizer: PreTrainedTokenizerBase, records: list[tuple[str, dict]],
                      d: DataConfig, steps: tuple[str, ...], max_new_tokens: int | None) -> dict[str, Any]:
    """Exact match and accuracy of the greedy answer to each record's prompt, plus the first misses."""
    opts = options(d)
    raw = not uses_chat(tokenizer, opts)
    exact = accurate = 0
    misses = []
    for where, record in records:
        prompt, answer = prompt_and_answer(record, tokenizer, opts, where)
        budget = max_new_tokens or len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS
        said = generate(tuned, tokenizer, prompt, max_new_tokens=budget, raw=raw)
        got, want = normalize(said, steps), normalize(answer, steps)
        exact += got == want
        accurate += starts_with_answer(got, want)
        if not starts_with_answer(got, want) and len(misses) < SHOWN_MISSES:
            misses.append({"where": where, "answer": answer, "generated": said})
    n = len(records)
    return {"exact_match": exact / n, "accuracy": accurate / n, "misses": misses}


def evaluate_file(tuned: TunedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                  metrics: list[str] | None = None, d: DataConfig | None = None,
                  normalize_steps: tuple[str, ...] = DEFAULT_NORMALIZE, max_new_tokens: int | None = None,
                  batch_size: int = 8) -> dict[str, Any]:
    """Score `tuned` on the records of `path`; returns {"examples", "kind", "metrics", ...}."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LmtuneError(f"max new tokens must be at least 1 (got {max_new_tokens})")
    d = d or DataConfig.model_construct(train=[])  # settings only: no training data
    use_chat_template(tokenizer, d.chat_template)
    records = read_records(path)
    kind = data_kind(records, path)
    chosen = choose_metrics(kind, metrics)
    device = next(tuned.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tuned.eval()
    result: dict[str, Any] = {"data": str(path), "kind": kind, "examples": len(records), "metrics": {}}
    if kind == "preference":
        pairs, _ = read_source(DataSource(path=str(path)), d, tokenizer, "dpo")
        result["metrics"]["preference_accuracy"] = preference_accuracy(tuned, pairs, pad_id, batch_size, device)
        return result
    if {"loss", "perplexity"} & set(chosen):
        examples, stats = read_source(DataSource(path=str(path)), d, tokenizer, "sft")
        loss = mean_loss(tuned, examples, pad_id, batch_size, device)
        result["metrics"].update({"loss": loss, "perplexity": math.exp(min(loss, 50.0))})
        result["label_tokens"], result["truncated"] = stats.label_tokens, stats.truncated
    if {"exact_match", "accuracy"} & set(chosen):
        scores = generation_scores(tuned, tokenizer, records, d, normalize_steps, max_new_tokens)
        result["metrics"].update({k: scores[k] for k in ("exact_match", "accuracy")})
        result["normalize"], result["misses"] = list(normalize_steps), scores["misses"]
    result["metrics"] = {k: v for k, v in result["metrics"].items() if k in chosen}
    return result
