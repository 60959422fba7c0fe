"""glibc malloc settings for the two long-running kinds of process: training and serving.

Training allocates and frees tens of MB per step (a batch's label scores, W_L's gradient, the gathered projection
rows). glibc serves blocks above its mmap threshold with fresh mappings and unmaps them when freed, so every step
would pay the kernel to fault in and zero hundreds of MB anew: a third of a TIBKAT stage-1 step
(bench/train_profile.py). With mmap off for large blocks, freed blocks stay in the heap and serve the next step.

Serving is the opposite: requests of any size arrive on many threads, and with glibc's defaults a burst of
multi-MB requests leaves freed memory spread over one arena per thread and a raised mmap threshold, so the
server's resident memory creeps up (bench/fuzz_grpc.py measured +25-45% over a few hundred such calls). Few arenas
and a fixed 1 MiB mmap threshold give large blocks back to the kernel as soon as they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def _glibc(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """The C library's function `name` (returning an int), or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None where the C library is not glibc."""
    return _glibc("mallopt", [ctypes.c_int, ctypes.c_int])


def reuse_freed_memory() -> bool:
    """Training: serve large blocks from the heap and keep freed ones (process-wide, from now on).

    Returns False where nothing was changed (not glibc).
    """
    mallopt = _mallopt()
    # Trim threshold: the most a free may leave unreturned at the top of the heap (2^31 - 1 bytes, the C int max).
    return mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory(arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Serving: at most `arenas` malloc arenas and blocks from `mmap_threshold` bytes up mapped and unmapped on
    their own, so memory freed after large requests goes back to the kernel. Returns False where nothing changed."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, arenas)) and bool(mallopt(M_MMAP_THRESHOLD,
                                                                                        mmap_threshold))


def release_freed_memory() -> bool:
    """Give the memory freed so far back to the kernel (glibc `malloc_trim`): after `reuse_freed_memory` nothing
    else does, and a phase that allocates differently (the ELIAS++ ranker after the training stages) would
    otherwise run beside the last one's freed heap. Returns False where nothing was done (not glibc)."""
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True
