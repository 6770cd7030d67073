"""The process's memory allocator setting for training: keep freed memory for reuse (glibc)."""
from __future__ import annotations

import ctypes

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to the system.

    By default glibc maps every allocation above an adaptive threshold (128 KiB to 32 MiB) afresh and unmaps it
    on free, and trims the heap when its top is free, so each CPU training step page-faults its activations
    and weight gradients anew. Kept, they are reused: a ResNet-18 step at 224 px (2 CPU threads) went from
    ~2.15 s to ~2.0 s, FP32 and QAT alike (docs/benchmarks.md). Process-wide, so the command line sets it, not
    the library. Returns False where the C library has no such settings (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
