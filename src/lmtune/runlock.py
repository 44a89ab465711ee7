"""One live run per output directory: an exclusive `fcntl` lock on `OUTPUT_DIR/.lmtune.lock`.

The kernel drops the lock when its process dies, even by SIGKILL, so a crashed run never blocks the next
one (its lock file stays, unlocked); the file keeps the holder's pid for the error message. Only the standard library: cheap to import.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
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
        if self._file is not None or os.environ.get("RANK", "0") != "0":  # one lock per run, not per process
            return
        path = self.out / LOCK
        while True:
            f = path.open("a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise LmtuneError(f"{self.out} is in use by a running lmtune process (pid {holder}); wait for it "
                                  "to finish or choose another output_dir") from None
            # The holder we waited on may have removed the file meanwhile: then lock the new one.
            if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        """Remove the lock file (a finished run keeps no trace of it), then let go."""
        if self._file is not None:
            (self.out / LOCK).unlink(missing_ok=True)
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
    except Exception as err:
        problem = storage_problem(err)
        if problem is None:
            raise
        raise LmtuneError(f"cannot write {getattr(err, 'filename', None) or out}: {problem}; free disk space or "
                          "choose a writable output_dir (earlier checkpoints are intact)") from None
    finally:
        lock.release()


def storage_problem(err: BaseException) -> str | None:
    """What went wrong with the disk (full, read-only, ...), or None when `err` is something else.

    safetensors reports an I/O failure as its own error type with the OS error number in the text.
    """
    if isinstance(err, OSError):
        return err.strerror if err.errno in _STORAGE_ERRORS else None
    found = re.search(r"os error (\d+)", str(err)) if type(err).__name__ == "SafetensorError" else None
    return os.strerror(int(found.group(1))) if found and int(found.group(1)) in _STORAGE_ERRORS else None


def check_new_path(path: Path, what: str, directory: bool = True) -> None:
    """Refuse, before any work, a `path` that cannot be created as a directory (`directory`) or a file.

    An existing directory is fine for a directory (the caller decides about its contents); a path under a
    file, or of the other kind, is a one-line error naming `what` (e.g. "output_dir", "--out").
    """
    if path.exists() and path.is_dir() != directory:
        kind = "a file" if directory else "a directory"
        raise LmtuneError(f"{what} {path} is {kind}; give a {'directory' if directory else 'file'} path")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LmtuneError(f"{what} {path}: {parent} is a file, not a directory; choose another path")
            break
