"""RowAdam: lazy Adam for a large embedding table with sparse, row-unique gradients.

First moments per element, second moments per row (one scalar), updated only for the rows in the
gradient. On the tf-idf projection this is about 3x cheaper per step than torch's SparseAdam. On the CPU the
update is one compiled pass over the gradient's rows (numba), which reads and writes each row of the table and of
its moments once, where the tensor version makes a temporary copy of them for every operation.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from elias_retrieval.kernel_threads import torch_sized_pool


def _rows_and_values(g: Tensor) -> tuple[Tensor, Tensor]:
    """Row ids and gradient rows of a sparse row gradient, each row once.

    An embedding's gradient is left uncoalesced; when its row ids are already strictly increasing (the tf-idf
    encoder looks up each batch's distinct features in sorted order) they are distinct, and the sort of a
    coalesce is skipped.
    """
    if not g.is_coalesced():
        idx = g._indices()[0]
        if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
            return idx, g._values()
        g = g.coalesce()
    return g.indices()[0], g.values()


@njit(parallel=True, cache=True)
def _fused_rows(p, exp_avg, exp_avg_sq, idx, g, b1, b2, step_size, bias2, eps):  # pragma: no cover - compiled
    """The RowAdam update of rows `idx` (distinct) of p (n, d), with gradient rows g (len(idx), d): the same
    arithmetic as RowAdam._step_tensors, in float32, one row per task."""
    d = g.shape[1]
    one = np.float32(1.0)
    for i in prange(idx.shape[0]):
        r = idx[i]
        sq = np.float32(0.0)
        for j in range(d):
            sq += g[i, j] * g[i, j]
        v = exp_avg_sq[r] + (one - b2) * (sq / np.float32(d) - exp_avg_sq[r])
        exp_avg_sq[r] = v
        scale = step_size / (np.sqrt(v / bias2) + eps)
        for j in range(d):
            m = exp_avg[r, j] + (one - b1) * (g[i, j] - exp_avg[r, j])
            exp_avg[r, j] = m
            p[r, j] -= scale * m


class RowAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                idx, gv = _rows_and_values(p.grad)
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(())
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                st["step"] += 1
                t = float(st["step"])
                if _fused(p, st):
                    f32 = np.float32
                    with torch_sized_pool():
                        _fused_rows(p.detach().numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy(),
                                    idx.contiguous().numpy(), gv.contiguous().numpy(), f32(b1), f32(b2),
                                    f32(group["lr"] / (1 - b1**t)), f32(1 - b2**t), f32(group["eps"]))
                else:
                    _step_tensors(p, st, idx, gv, b1, b2, t, group["lr"], group["eps"])


def _fused(p: Tensor, st: dict[str, Tensor]) -> bool:
    """Whether the compiled CPU update applies: float32 CPU tensors laid out row after row."""
    return (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            and st["exp_avg"].is_contiguous() and st["exp_avg_sq"].dtype == torch.float32)


def _step_tensors(p: Tensor, st: dict[str, Tensor], idx: Tensor, gv: Tensor, b1: float, b2: float, t: float,
                  lr: float, eps: float) -> None:
    """The RowAdam update in tensor operations (CUDA, other dtypes; the reference the compiled one is held to)."""
    m = st["exp_avg"].index_select(0, idx).lerp_(gv, 1 - b1)
    sq = torch.linalg.vector_norm(gv, dim=1).square_().div_(gv.shape[1])  # mean of g^2 per row
    v = st["exp_avg_sq"].index_select(0, idx).lerp_(sq, 1 - b2)
    st["exp_avg"].index_copy_(0, idx, m)
    st["exp_avg_sq"].index_copy_(0, idx, v)
    denom = v.div_(1 - b2**t).sqrt_().add_(eps).unsqueeze(1)
    p.index_add_(0, idx, m.div_(denom), alpha=-lr / (1 - b1**t))
