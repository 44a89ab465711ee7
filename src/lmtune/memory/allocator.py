"""glibc's allocator, told at start-up to give freed tensor memory back to the kernel.

By default glibc serves allocations under a dynamic threshold (it grows up to 32 MiB as blocks are freed) from
its heap and keeps freed heap memory for reuse, so a training process's resident set stays far above its live
tensors: on the default model 7-59% above the estimate (benchmarks/memory_accuracy.py, 2026-12-02). With a
fixed 64 KiB mmap threshold every tensor-sized block is mapped on allocation and unmapped on free, and the
resident set follows the live bytes the estimate counts. The small blocks left on the heap are trimmed from its
top as it shrinks (trim threshold 0), but glibc keeps M_TOP_PAD = 64 MiB of it: without that pad the heap was
given back and grown again on nearly every step, 1.9 M of the 6.6 M page faults of a quickstart run.

Measured 2026-12-03, `lmtune train examples/quickstart.yaml train.steps=4` (LoRA all-linear, 4 x <=155 tokens),
one thread, whole-process user + system CPU seconds and minor faults from /usr/bin/time, the run's own peak
(resident set above its start), two interleaved runs (README, Memory, "The allocator"):
  glibc's defaults (LMTUNE_ALLOCATOR=system)   33.4 / 32.1 s   2.35 / 2.38 GiB   0.7 M faults
  64 KiB, trim 0 (the setting before this)      40.9 / 39.2 s   1.92 / 1.92 GiB   6.6 M faults   1.22x
  64 KiB, trim 0, top pad 64 MiB (this)         38.4 / 36.7 s   1.94 / 1.94 GiB   4.7 M faults   1.15x
  1 MiB, trim 0, top pad 64 MiB (one run)       35.7 s          2.03 GiB          3.5 M faults   1.09x
The rest of the cost is faulting in freshly mapped tensor pages (~1.3 us a fault here), which nothing that returns
tensor memory avoids: a larger mmap threshold trades peak for time (4 MiB: no lower peak at all), and neither a
256 MiB pad, a 32 MiB trim threshold, torch's THP_MEM_ALLOC_ENABLE (fewer faults, each dearer) nor malloc_trim(0)
after loading and evaluation (no lower peak) did better. The pad's limit: glibc carves blocks of any size from the
heap's top while it has room, so a program taking a small block between every two large ones re-pads the heap each
time and keeps its large blocks resident, as glibc's defaults do (tests/test_memory.py); the benchmark's training
runs did not. `mallopt` works at any time for the allocations that follow, so `lmtune` sets it first thing
(`cli.main`, and the pre-flight check that `lmtune.train.run` starts with).

The kernel caches. On a CPU with bf16 units torch runs bf16 matmuls through oneDNN, which keeps every compiled
kernel ("primitive") it made in a cache of 1,024 entries, and ideep (torch's layer over it) keeps its own LRU cache
of 1,024 more. A primitive is made per shape; a training step on batches of varying length meets ~30 new shapes
(every linear layer's forward and two backward products at the new length), each entry holding 0.3-1 MiB, so the
caches grow by ~15 MiB a step until full, and a run's peak grows with its length: the quickstart (bf16, 30 steps)
peaked at 1.47 GiB against 1.17 estimated (-20 %), its 80 steps at 1.68 (-30 %). lmtune bounds both caches at
KERNEL_CACHE entries, enough for one step's kernels at a fixed shape (packed 4 x 256 batches ran no slower: LoRA
142 vs 159 CPU s, full 174 vs 184): the quickstart's 30 steps 1.18 GiB (-0.6 %), 183 vs 190 CPU s
(`benchmarks/results/memory/kernel_cache.md`).
Both read their capacity from the environment at their first use, so it is set here, before any matmul of the run.

Opt out with `LMTUNE_ALLOCATOR=system`; a user's own `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` /
`MALLOC_TOP_PAD_` / `ONEDNN_PRIMITIVE_CACHE_CAPACITY` / `LRU_CACHE_CAPACITY` are left in force. Other C libraries
(musl, macOS, Windows) keep their allocator; the kernel caches are bounded on every system.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

MMAP_THRESHOLD = 64 * 1024
"""Allocations of at least this many bytes get their own mapping, returned to the kernel on free."""
TOP_PAD = 64 * 1024 * 1024
"""Free memory glibc keeps at the top of its heap when it trims, so that the next step does not fault it in again."""
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
ENV = "LMTUNE_ALLOCATOR"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
KERNEL_CACHE = 64
"""Entries oneDNN's primitive cache and ideep's LRU cache may hold (0 would crash ideep, torch 2.13)."""
_KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

_state: dict[str, bool] = {}


def configure_allocator() -> bool:
    """Bound torch's CPU kernel caches and set glibc's mmap threshold, trim threshold and top pad, once per
    process; True when lmtune's glibc setting is in force."""
    if "done" not in _state:
        if os.environ.get(ENV, "lmtune") != "system":
            for name in _KERNEL_CACHES:
                os.environ.setdefault(name, str(KERNEL_CACHE))
        _state["done"] = _apply()
    return _state["done"]


def _apply() -> bool:
    if os.environ.get(ENV, "lmtune") == "system" or any(k in os.environ for k in _USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success.
    return all(mallopt(option, value) == 1 for option, value in
               ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, 0), (_M_TOP_PAD, TOP_PAD)))
