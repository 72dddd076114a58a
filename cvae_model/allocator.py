"""Keep freed tensor memory in the process while training (glibc's malloc settings).

A training step frees and allocates the same tensors every step: activations, gradients (the
optimizer sets them to None), temporaries of a few hundred KB to tens of MB. glibc serves
blocks above its mmap threshold with fresh ``mmap`` pages and returns the top of the heap to
the kernel once more than its trim threshold is free there, so each step page-faults its
tensors in again: hundreds to thousands of minor faults per step at dim_latent=64 and 64 rows,
over ten thousand at 512 rows, and a few percent to tens of percent of the steps/s
(``benchmarks/malloc_effect.py``; its latest table is in benchmarks/README.md). PyTorch's CPU
tuning guide recommends jemalloc or tcmalloc for the same reason; these two settings are the
part of that which glibc itself offers.

The settings are process-wide and last: freed memory up to ``TRIM_THRESHOLD`` stays with the
process instead of going back to the kernel. ``CVAE_MALLOC_TUNING=0`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

logger = logging.getLogger("cvae")

MMAP_THRESHOLD = 32 * 1024**2
"""Blocks below this come from the heap, not from their own ``mmap`` (glibc's largest allowed
value on 64-bit: half its 64 MiB arena size)."""
TRIM_THRESHOLD = 256 * 1024**2
"""Free memory at the top of the heap kept before glibc returns it to the kernel."""
_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process, where the C library is glibc; True if in force.

    A no-op (False) elsewhere (macOS, musl), under another allocator preloaded with
    ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc already keep memory, and glibc's settings would
    not reach them), and when ``CVAE_MALLOC_TUNING=0``."""
    global _applied
    if _applied:
        return True
    preloaded = os.environ.get("LD_PRELOAD", "")
    if (os.environ.get("CVAE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux")
            or any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc"))):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [name for name, parameter, value in (
        ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)) if not mallopt(parameter, value)]
    if refused:
        logger.debug("mallopt refused %s; training with glibc's own value for it",
                     " and ".join(refused))
    _applied = not refused
    return _applied
