"""`lmtune export`: a run (or a base model) merged and written in a format other tools run.

GGUF is the format of llama.cpp, Ollama and LM Studio; an Ollama `Modelfile` is written beside the file.
A method that cannot be folded into the base weights (prompt / prefix tuning, Houlsby adapters) is refused,
since those tools run plain models only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from lmtune.errors import LmtuneError
from lmtune.export.gguf_file import QUANTS, Quant, arch_of, write_gguf
from lmtune.export.modelfile import modelfile
from lmtune.export.vocab import read_vocab
from lmtune.runlock import storage_problem

log = logging.getLogger("lmtune")
FORMATS = ("gguf",)


def _check(fmt: str, quant: str, out: Path) -> None:
    if fmt not in FORMATS:
        raise LmtuneError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise LmtuneError(f"unknown GGUF type '{quant}'; choose one of: {', '.join(QUANTS)}")
    if out.suffix != ".gguf":
        raise LmtuneError(f"--out {out}: a GGUF file name ends in .gguf")
    if out.exists():
        raise LmtuneError(f"{out} exists; choose a new file name or delete it")


def _write_atomically(out: Path, write) -> None:
    """`write(path)` into a temp file beside `out`, renamed into place: a failed export leaves no file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as err:
        problem = storage_problem(err)
        if problem is None:
            raise
        raise LmtuneError(f"cannot write {out}: {problem}; free disk space or choose a writable directory") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(run_dir: str | None, out: str | Path, fmt: str = "gguf", quant: Quant = "f16",
           model: str | None = None) -> Path:
    """Merge `run_dir` (or load `model`, None = the default model) and write it to `out`; returns the Modelfile."""
    from lmtune.checkpoint import load_merged
    from lmtune.models import load_model

    out = Path(out)
    _check(fmt, quant, out)
    if run_dir is not None:
        merged, tokenizer = load_merged(run_dir)
    else:
        merged, tokenizer = load_model(model)
    arch_of(merged)  # refuse an unsupported architecture before reading the vocabulary
    vocab = read_vocab(tokenizer, merged.config.vocab_size)
    name = Path(run_dir).name if run_dir else (model or "SmolLM2-135M-Instruct")
    _write_atomically(out, lambda path: write_gguf(merged, vocab, path, quant, name))
    text = modelfile(out.name, tokenizer)
    target = out.parent / "Modelfile"
    target.write_text(text)
    log.info("wrote %s (%.1f MB) and %s", out, out.stat().st_size / 1e6, target)
    return target
