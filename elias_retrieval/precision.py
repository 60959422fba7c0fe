"""Which floating-point type the large training products run in, decided from the hardware at run time.

bf16 products (fp32 accumulation) are 3-4x faster than fp32 ones on CPUs with native bf16 instructions
(AVX512-BF16, AMX) and on CUDA GPUs that support bf16; elsewhere a CPU emulates them slower than fp32.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


class PrecisionError(ValueError):
    """An unknown precision setting, or bf16 asked for where the hardware has none."""


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not available)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_fast_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run natively: AVX512-BF16 or AMX on a CPU, bf16 support on CUDA."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def matmul_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of the large training products for `setting` ("auto", "fp32" or "bf16") on `device`."""
    if setting not in PRECISIONS:
        raise PrecisionError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "fp32" or (setting == "auto" and not has_fast_bf16(device)):
        return torch.float32
    return torch.bfloat16
