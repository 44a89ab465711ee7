"""From `data:` in the config to training and evaluation sets: sources read (cached), held out, mixed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lmtune.config import DataConfig, DataSource
from lmtune.data import TokenStats, reweight, split, tokenize_records
from lmtune.data import cache as token_cache
from lmtune.data.format import RenderOptions
from lmtune.errors import LmtuneError

log = logging.getLogger("lmtune")


def use_chat_template(tokenizer: PreTrainedTokenizerBase, path: str | None) -> None:
    """Replace the tokenizer's chat template with the Jinja file `path` (saved with the result)."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise LmtuneError(f"data.chat_template: file not found: {p}")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment().parse(p.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - any template syntax error, one line
        raise LmtuneError(f"data.chat_template: {p} is not a valid Jinja template ({err})") from None
    tokenizer.chat_template = p.read_text(encoding="utf-8")


def options(d: DataConfig) -> RenderOptions:
    return RenderOptions(d.prompt_format, d.assistant_turns, d.prompt_template)


def read_source(source: DataSource, d: DataConfig, tokenizer: PreTrainedTokenizerBase,
                task: str, fingerprint: str | None = None) -> tuple[list, TokenStats]:
    """One source tokenised, from the cache when the same file, tokenizer and options were seen before."""
    opts = options(d)
    settings = {"task": task, "max_length": d.max_length, "skip_bad": d.skip_bad_records,
                "prompt_format": opts.prompt_format, "assistant_turns": opts.assistant_turns,
                "prompt_template": opts.prompt_template}
    from lmtune.models import cache_dir

    key = None
    if d.cache:
        fingerprint = fingerprint or token_cache.tokenizer_fingerprint(tokenizer)
        key = token_cache.cache_key(source.path, fingerprint, settings)
    if key is not None and (hit := token_cache.load(cache_dir(), key)) is not None:
        log.info("data: %s tokenised before, read from the cache", source.path)
        return hit
    items, stats = tokenize_records(source.path, tokenizer, d.max_length, opts, task, d.skip_bad_records)
    if stats.skipped_bad:
        log.warning("data: %s: skipped %d bad records (first: %s)", source.path, stats.skipped_bad, stats.first_bad)
    if key is not None:
        token_cache.store(cache_dir(), key, items, stats)
    return items, stats


def mix_sources(d: DataConfig, seed: int,
                read: Callable[[DataSource], tuple[list, TokenStats]]) -> tuple[list, list, TokenStats]:
    """(train, eval, train stats) from `read` of each source: each training source held out (when no eval data)
    and weighted. Every task's records go through here, whatever `read` makes of them."""
    train, evals, stats = [], [], TokenStats()
    for i, source in enumerate(d.train):
        items, source_stats = read(source)
        stats.add(source_stats)
        if d.eval is None:
            items, held = split(items, d.eval_split, seed)
            evals += held
        train += reweight(items, source.weight, seed + i)
    for source in d.eval or ():
        evals += read(source)[0]
    return train, evals, stats


def load_data(d: DataConfig, tokenizer: PreTrainedTokenizerBase, task: str,
              seed: int) -> tuple[list, list, TokenStats]:
    """(train, eval, train stats) of tokenised examples or pairs (`mix_sources`)."""
    use_chat_template(tokenizer, d.chat_template)
    fingerprint = token_cache.tokenizer_fingerprint(tokenizer) if d.cache else None
    return mix_sources(d, seed, lambda source: read_source(source, d, tokenizer, task, fingerprint))
