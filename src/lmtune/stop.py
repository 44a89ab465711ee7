"""Stop a run cleanly: on SIGINT or SIGTERM the loop finishes its optimizer step, saves a resumable checkpoint
and leaves; `lmtune train` with the same config then resumes from it. A second signal stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """The run stopped on request after saving a checkpoint; the CLI exits 130 with this message."""


class StopFlag:
    """Set by the handler; the loop reads it between optimizer steps (a step is never cut in half)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_on_signal() -> Iterator[StopFlag]:
    """Turn SIGINT / SIGTERM into a stop request for the block; the previous handlers come back after it,
    and already after the first signal, so a second one acts as it would have without us."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum: int, frame) -> None:
        flag.signal = signum
        for s, h in previous.items():
            signal.signal(s, h)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
