"""numba's thread pool sized like torch's while a compiled kernel runs beside torch's own work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import torch


@contextmanager
def torch_sized_pool() -> Iterator[None]:
    """Run numba's parallel loops on as many threads as torch uses (at most numba's pool), then restore its size."""
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
