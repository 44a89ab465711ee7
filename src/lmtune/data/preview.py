"""`lmtune data preview`: what the model will be trained on, before any training.

A wrong chat template or a wrong loss mask trains silently on the wrong tokens; here both are visible:
each shown example is the exact token sequence, with the tokens that carry loss between [[ and ]].
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from lmtune.config import RunConfig
from lmtune.data import Example, Pair, tokenize_one
from lmtune.data.format import IGNORE
from lmtune.data.pipeline import options, read_source, use_chat_template
from lmtune.data.read import read_records
from lmtune.tasks import get_task

OPEN, CLOSE = "[[", "]]"


def marked(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    """The example's text, trained-on runs of tokens between [[ and ]] (the first token never is: no context)."""
    pieces, run, learned = [], [], False
    for i, (token, label) in enumerate(zip(example.input_ids, example.labels, strict=True)):
        now = i > 0 and label != IGNORE
        if now != learned and run:
            text = tokenizer.decode(run)
            pieces.append(f"{OPEN}{text}{CLOSE}" if learned else text)
            run = []
        run.append(token)
        learned = now
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{OPEN}{text}{CLOSE}" if learned else text)
    return "".join(pieces)


def preview(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, count: int = 3) -> str:
    task = get_task(cfg.task)
    if task.preview is not None:
        return task.preview(cfg, tokenizer, count)
    use_chat_template(tokenizer, cfg.data.chat_template)
    lines = [f"task {cfg.task}; text between {OPEN} and {CLOSE} is trained on"]
    sources = [("train", s) for s in cfg.data.train] + [("eval", s) for s in cfg.data.eval or ()]
    for role, source in sources:
        _, stats = read_source(source, cfg.data, tokenizer, task.records)
        unit = {"pairs": "pairs", "pretrain": "blocks"}.get(task.records, "examples")
        lines.append(f"\n{role} {source.path} (weight {source.weight:g}): {stats.examples} {unit}, "
                     f"{stats.tokens} tokens ({stats.label_tokens} trained on), {stats.truncated} truncated "
                     f"({stats.tokens_cut} tokens cut), {stats.dropped_no_labels} fully masked (dropped), "
                     f"{stats.skipped_bad} bad records skipped")
        if stats.first_bad:
            lines.append(f"  first bad record: {stats.first_bad}")
        if role == "eval":
            continue
        bad: list[str] = []
        for where, record in read_records(source.path, bad)[:count]:
            records = "sft" if task.records == "pretrain" else task.records  # one document, before its blocks
            try:
                item = tokenize_one(record, tokenizer, options(cfg.data), records, where)
            except Exception as err:  # noqa: BLE001 - a bad record is shown as what it is
                lines.append(f"--- {where}: {err}")
                continue
            if isinstance(item, Pair):
                lines += [f"--- {where} chosen ---", marked(item.chosen, tokenizer),
                          f"--- {where} rejected ---", marked(item.rejected, tokenizer)]
            else:
                lines += [f"--- {where} ---", marked(item, tokenizer)]
    return "\n".join(lines)
