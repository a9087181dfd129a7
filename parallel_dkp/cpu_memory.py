"""Host memory reuse for training processes (glibc's allocator).

By default glibc serves every allocation above a (dynamically raised, at most 32 MiB) threshold
with a fresh ``mmap`` and returns it with ``munmap`` when freed, and trims the heap's free top.
A training step frees and re-allocates the same large activations and gradients every time, so
each step pays page faults that zero fresh pages: on the 2-core VM this was a third of a conv2
step and the main source of step-to-step noise (``docs/performance.md``). Turning off ``mmap``
for allocations and heap trimming makes freed memory stay in the process for the next step,
which is what jemalloc or tcmalloc (``LD_PRELOAD``) give; PyTorch's GPU caching allocator does
the same for device memory. ``mallopt`` changes the running process, so no environment variable
or preload is needed, and DataLoader workers forked later inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for reuse; ``True`` when glibc accepted it (Linux), else
    ``False`` and nothing changed. Idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return _applied
