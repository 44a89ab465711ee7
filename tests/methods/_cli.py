"""For a `cli` fixture: run `lmtune ARGS` in process through `lmtune.cli.main`, as tests/test_cli.py does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

CHAT = {"messages": [{"role": "user", "content": "What is two plus two?"},
                     {"role": "assistant", "content": "It is four."}]}


def in_process_cli(capfd, monkeypatch, tmp_path) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """A fixture body: yields `run(*args)`, which runs `lmtune ARGS` in `tmp_path` through `lmtune.cli.main` and
    returns (exit code, stdout, stderr); afterwards restores the logging settings `main` changes."""
    import transformers.utils.logging as hf_logging

    from lmtune.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    verbosity, bars, level = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), \
        logging.getLogger("lmtune").level

    def run(*args: str) -> tuple[int, str, str]:
        capfd.readouterr()
        code = main(list(args))
        return (code, *capfd.readouterr())

    yield run
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()
    logging.getLogger("lmtune").setLevel(level)
