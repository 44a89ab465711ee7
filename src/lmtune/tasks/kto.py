"""KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306): alignment from unpaired feedback, each
completion marked desirable or not, as TRL's KTOTrainer computes it.

Records (TRL's unpaired preference format): `{"prompt", "completion", "label": true | false}`, prompt and
completion strings or lists of chat turns; a `{"prompt", "chosen", "rejected"}` pair is read as two records
(chosen true, rejected false). Per completion y of prompt x, with r = log p(y|x) - log p_ref(y|x):

    desirable:   1 - sigmoid(beta * (r - z)),    undesirable:   1 - sigmoid(beta * (z - r))
    z = max(0, mean over the batch of log p(y'|x) - log p_ref(y'|x)), no gradient

where y' is the completion of the batch's previous row (mismatched pairs estimate the KL term). The loss is the
mean over completions; `preference.beta` (default 0.1); both class weights are 1 (TRL's default: balance the
data instead). The reference is the model with its method switched off, or for full / freeze a frozen copy
(`tasks.reference`). Eval reports the loss, `rewards/accuracy` (the share of completions whose reward beta * r has
the sign of its label: 0 at the start, where the policy is the reference), `rewards/signed` (beta * r,
negated for undesirable ones) and `kl` (z). Needs train.batch_size >= 2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmtune.data import Example, TokenStats, collate
from lmtune.data.format import IGNORE, render_pair, tokenize
from lmtune.data.pipeline import mix_sources, options, use_chat_template
from lmtune.data.read import read_records
from lmtune.errors import LmtuneError
from lmtune.objectives import sequence_logps
from lmtune.tasks import Task, reference, register


@dataclass
class Unpaired:
    """One completion of a prompt, tokenised as prompt + completion, and whether it is desirable."""

    input_ids: list[int]
    labels: list[int]
    start: int
    """Where the completion starts (its first learned token)."""
    desirable: bool


def _records(record: dict, where: str) -> list[dict]:
    if all(k in record for k in ("prompt", "chosen", "rejected")):
        return [{"prompt": record["prompt"], "completion": record["chosen"], "label": True},
                {"prompt": record["prompt"], "completion": record["rejected"], "label": False}]
    if not all(k in record for k in ("prompt", "completion", "label")):
        raise LmtuneError(f"{where}: task kto reads {{prompt, completion, label}} records (or prompt/chosen/rejected "
                          f"pairs); this one has {', '.join(sorted(record)) or 'no fields'}")
    if not isinstance(record["label"], bool):
        raise LmtuneError(f"{where}: field 'label' must be true (a desirable completion) or false "
                          f"(got {record['label']!r})")
    return [record]


def _tokenised(record: dict, tokenizer, opts, max_length: int, where: str, stats: TokenStats) -> Unpaired | None:
    as_pair = {"prompt": record["prompt"], "chosen": record["completion"], "rejected": record["completion"]}
    ids, labels = tokenize(render_pair(as_pair, tokenizer, opts, where)[0], tokenizer)
    if len(ids) > max_length:
        stats.truncated, stats.tokens_cut = stats.truncated + 1, stats.tokens_cut + len(ids) - max_length
        ids, labels = ids[:max_length], labels[:max_length]
    learned = sum(label != IGNORE for label in labels[1:])
    if learned == 0:
        stats.dropped_no_labels += 1
        return None
    stats.label_tokens, stats.tokens = stats.label_tokens + learned, stats.tokens + len(ids)
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    return Unpaired(ids, labels, start, record["label"])


def read_unpaired(path: str, tokenizer, d) -> tuple[list[Unpaired], TokenStats]:
    """Every completion of `path`; bad records are fatal unless data.skip_bad_records."""
    stats, rows, bad = TokenStats(), [], [] if d.skip_bad_records else None
    for where, record in read_records(path, bad):
        try:
            found = [_tokenised(r, tokenizer, options(d), d.max_length, where, stats) for r in _records(record, where)]
        except LmtuneError as err:
            if bad is None:
                raise
            bad.append(str(err))
            continue
        rows += [r for r in found if r is not None]
    stats.skipped_bad, stats.first_bad, stats.examples = len(bad or ()), (bad or [None])[0], len(rows)
    if not rows:
        raise LmtuneError(f"{path}: no completion to learn from" + (f" (first bad record: {stats.first_bad})"
                                                                     if stats.first_bad else ""))
    return rows, stats


def load_unpaired(cfg, tokenizer) -> tuple[list[Unpaired], list[Unpaired], TokenStats]:
    """(train, eval, train stats) like the data pipeline's: held out when no eval file is given, weighted."""
    d, seed = cfg.data, cfg.train.seed
    if cfg.train.batch_size < 2:
        raise LmtuneError("task kto needs train.batch_size >= 2: its KL term pairs each prompt with another row's "
                          "completion")
    use_chat_template(tokenizer, d.chat_template)
    return mix_sources(d, seed, lambda source: read_unpaired(source.path, tokenizer, d))


def collate_unpaired(rows: list[Unpaired], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """The completions, and the mismatched rows of the KL term: prompt i with completion i - 1 (`kl_*`)."""
    batch = collate([Example(r.input_ids, r.labels) for r in rows], pad_id)
    shifted = [Example(r.input_ids[:r.start] + o.input_ids[o.start:], [IGNORE] * r.start + o.labels[o.start:])
               for r, o in zip(rows, rows[-1:] + rows[:-1], strict=True)]
    kl = collate([Example(e.input_ids[:max_length], e.labels[:max_length]) for e in shifted], pad_id)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    batch["desirable"] = torch.tensor([r.desirable for r in rows])
    batch["loss_units"] = torch.tensor(len(rows))  # the loop normalises by completions
    return batch


def _kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("kl_"): v for k, v in batch.items() if k.startswith("kl_")}


def kto_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(summed loss, completions, metrics) on a `collate_unpaired` batch."""
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    logps = sequence_logps(model, rows)[0]
    with torch.no_grad():
        kl_logps = sequence_logps(model, _kl_batch(batch))[0]
    with reference.reference_model(model) as ref:
        ref_logps, ref_kl = sequence_logps(ref, rows)[0], sequence_logps(ref, _kl_batch(batch))[0]
    z = (kl_logps - ref_kl).mean().clamp(min=0).detach()
    ratio = logps - ref_logps
    good = batch["desirable"].to(logps.device)
    losses = torch.where(good, 1 - F.sigmoid(beta * (ratio - z)), 1 - F.sigmoid(beta * (z - ratio)))
    reward = beta * ratio.detach()
    signed = torch.where(good, reward, -reward)
    return losses.sum(), torch.tensor(losses.numel()), {
        "rewards/accuracy": float((signed > 0).float().sum()), "rewards/signed": float(signed.sum()),
        "kl": float(z) * losses.numel()}


def _beta(cfg) -> float:
    return cfg.preference.beta if cfg.preference.beta is not None else 0.1


register(Task(
    name="kto", summary="unpaired feedback: {prompt, completion, label} records (or pairs, split in two), KTO loss "
    "against the base model; eval reports loss, reward sign accuracy, signed reward and the KL estimate",
    objective=lambda cfg: functools.partial(kto_loss, beta=_beta(cfg)), section="preference", load=load_unpaired,
    collate=lambda cfg, pad_id: functools.partial(collate_unpaired, pad_id=pad_id, max_length=cfg.data.max_length),
    prepare_model=reference.hold_copy_if_needed, memory_task="dpo"))
