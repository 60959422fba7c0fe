"""Rows of a float32 table gathered and cast in one pass, with a backward that widens and places them in one pass.

Stage 1's cluster blocks read every used cluster's labels from W_L in the products' input type (bf16 where the
hardware has it). In torch ops that is a cast of all of W_L, then a gather; and backward, a zeroed (L, d) gradient,
an index_add into it and a cast back to float32: five passes over an L x d matrix every step (at 32k labels and
d = 768, about a quarter of a CPU training step). When each label is read at most once, as under stage 1's
partition, the gradient's rows are placed, not summed: one pass each way.

bf16 is float32's top half, rounded to nearest even (torch's own rounding; NaN stays NaN), so the kernels work
on the bits: float32 as uint32, bf16 as uint16.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from elias_retrieval.kernel_threads import torch_sized_pool


@njit(inline="always")
def _bf16_bits(u):  # pragma: no cover - compiled
    """A float32's bit pattern rounded to bf16's (nearest even; NaN stays NaN), in the low 16 bits."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint32(0x7FC0)
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(parallel=True, cache=True)
def _gather(src, labels, out):  # pragma: no cover - compiled
    """out[i] = src[labels[i]] (bit patterns, rounded to bf16 when `out` is 16-bit), zero where labels[i] is out
    of range (a pad slot)."""
    n, d = src.shape
    narrow = out.itemsize < src.itemsize
    for i in prange(labels.shape[0]):
        lab = labels[i]
        if lab < 0 or lab >= n:
            for j in range(d):
                out[i, j] = 0
            continue
        for j in range(d):
            out[i, j] = _bf16_bits(src[lab, j]) if narrow else src[lab, j]


@njit(parallel=True, cache=True)
def _zero_uncovered(grad, covered):  # pragma: no cover - compiled
    d = grad.shape[1]
    for r in prange(grad.shape[0]):
        if not covered[r]:
            for j in range(d):
                grad[r, j] = 0


@njit(parallel=True, cache=True)
def _place(g, labels, grad):  # pragma: no cover - compiled
    """grad[labels[i]] = g[i] (bit patterns, bf16 widened to float32 when `g` is 16-bit), for the in-range labels
    (each at most once)."""
    n, d = grad.shape
    wide = g.itemsize < grad.itemsize
    for i in prange(labels.shape[0]):
        lab = labels[i]
        if lab < 0 or lab >= n:
            continue
        for j in range(d):
            grad[lab, j] = (np.uint32(g[i, j]) << np.uint32(16)) if wide else g[i, j]


def _bits(t: Tensor) -> np.ndarray:
    """A contiguous CPU float32 or bf16 tensor's elements as unsigned integers of its width (shared memory)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy().view(np.uint32)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: Tensor, dtype: torch.dtype, *label_parts: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        src = _bits(table.detach())
        outs = []
        with torch_sized_pool():
            for labels in label_parts:
                out = torch.empty(labels.shape[0], table.shape[1], dtype=dtype)
                _gather(src, labels.numpy(), _bits(out))
                outs.append(out)
        ctx.save_for_backward(*label_parts)
        ctx.shape = table.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        label_parts = ctx.saved_tensors
        grad = torch.empty(ctx.shape, dtype=torch.float32)
        covered = np.zeros(ctx.shape[0], dtype=np.bool_)
        for labels in label_parts:
            lab = labels.numpy()
            covered[lab[(lab >= 0) & (lab < ctx.shape[0])]] = True
        dst = _bits(grad)
        with torch_sized_pool():
            _zero_uncovered(dst, covered)
            for labels, g in zip(label_parts, grads, strict=True):
                g = g.contiguous()
                _place(_bits(g), labels.numpy(), dst)
        return (grad, None, *([None] * len(label_parts)))


def fused_route_applies(table: Tensor, dtype: torch.dtype) -> bool:
    """Whether `gather_rows` runs the compiled pass: a contiguous float32 CPU table read as float32 or bf16."""
    return (table.device.type == "cpu" and table.dtype == torch.float32 and table.is_contiguous()
            and dtype in (torch.float32, torch.bfloat16))


def distinct(labels: Tensor, num_rows: int) -> bool:
    """Whether the in-range entries of `labels` name each row at most once."""
    inside = labels[(labels >= 0) & (labels < num_rows)]
    return bool(torch.bincount(inside, minlength=num_rows).max() <= 1) if inside.numel() else True


def gather_rows(table: Tensor, label_parts: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """table[labels].to(dtype) for each part of `label_parts` (int64 CPU tensors, each row named at most once over
    all parts; an out-of-range id gives a zero row), differentiable in `table`: its gradient's rows are the parts'
    gradients widened to float32 (zero for the rows no part names). Needs `fused_route_applies(table, dtype)`."""
    return list(_GatherRows.apply(table, dtype, *label_parts))
