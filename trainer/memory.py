"""Keeping freed memory for reuse during training.

A training step allocates and frees tensors of tens of MB (a batch's label scores, W_L's gradient, the gathered
projection rows). glibc serves blocks above its mmap threshold (at most 32 MB) with fresh mappings and unmaps
them when freed, so every step pays the kernel to fault in and zero hundreds of MB anew: a third of a TIBKAT
stage-1 step (bench/train_profile.py). Turning off mmap for large blocks makes freed blocks stay in the heap
and serve the next step's allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def reuse_freed_memory() -> bool:
    """Ask glibc malloc to serve large blocks from its heap and keep freed ones (process-wide, from now on).

    Returns False where the C library is not glibc (nothing is changed there).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Trim threshold: the most a free may leave unreturned at the top of the heap (2^31 - 1 bytes, the C int max).
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
