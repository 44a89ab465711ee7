"""One live run per output directory: an exclusive `fcntl` lock on `OUTPUT_DIR/.lmtune.lock`.

The kernel drops the lock when its process dies, even by SIGKILL, so a crashed run never blocks the next
one; the file keeps the holder's pid for the error message. Only the standard library: cheap to import.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmtune.errors import LmtuneError

LOCK = ".lmtune.lock"
# Errors of the storage a run writes to, reported as one line instead of a traceback.
_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class RunLock:
    """An exclusive `fcntl` lock on `OUTPUT_DIR/.lmtune.lock`; the kernel drops it when the process dies."""

    def __init__(self, out: Path) -> None:
        self.out, self._file = out, None

    def acquire(self) -> None:
        if self._file is not None:
            return
        f = (self.out / LOCK).open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise LmtuneError(f"{self.out} is in use by a running lmtune process (pid {holder}); wait for it to "
                              "finish or choose another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextmanager
def run_lock(out: Path) -> Iterator[RunLock]:
    """Hold the lock of `out` for the block; taken at once if `out` exists, else when the run creates it."""
    lock = RunLock(out)
    try:
        if out.is_dir():
            lock.acquire()
        yield lock
    except OSError as err:
        if err.errno in _STORAGE_ERRORS:
            where = err.filename or out
            raise LmtuneError(f"cannot write {where}: {err.strerror}; free disk space or choose a writable "
                              "output_dir (earlier checkpoints are intact)") from None
        raise
    finally:
        lock.release()
