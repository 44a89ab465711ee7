"""Tokenised data kept on disk (JSON, never pickle), keyed by everything that changes the tokens:
the file's bytes, the tokenizer (vocabulary, special tokens, chat template) and the data options."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from lmtune.data import Example, Pair, TokenStats

VERSION = 1  # bump when rendering or tokenising changes what a record becomes


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.all_special_tokens,
                        tokenizer.eos_token])
    return hashlib.sha256((vocab + extra).encode()).hexdigest()


def cache_key(path: str, fingerprint: str, options: dict[str, Any]) -> str | None:
    """None for data that is not a local file (hub datasets are cached by `datasets` itself).
    `fingerprint`: `tokenizer_fingerprint(tokenizer)`, computed once per run (hashing a vocabulary takes a while)."""
    p = Path(path)
    if not p.is_file():
        return None
    digest = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(fingerprint.encode())
    # The path too: its suffix decides how the bytes parse, and its name is in the error locations kept.
    digest.update(json.dumps({"version": VERSION, "path": str(p.resolve()), **options}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _cache_file(root: Path, key: str) -> Path:
    return root / "tokenized" / f"{key}.json"


def load(root: Path, key: str) -> tuple[list, TokenStats] | None:
    f = _cache_file(root, key)
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # absent or torn: tokenise again
    items = [Pair(Example(*c), Example(*r)) if kind == "pair" else Example(*c) for kind, c, r in data["items"]]
    return items, TokenStats(**data["stats"])


def store(root: Path, key: str, items: list, stats: TokenStats) -> None:
    """Written to a temporary name and renamed, so a killed run never leaves a torn entry."""
    rows = [("pair", [i.chosen.input_ids, i.chosen.labels], [i.rejected.input_ids, i.rejected.labels])
            if isinstance(i, Pair) else ("one", [i.input_ids, i.labels], None) for i in items]
    f = _cache_file(root, key)
    f.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump({"items": rows, "stats": asdict(stats)}, out)
    os.replace(tmp, f)
