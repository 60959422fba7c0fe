"""Pruning A's rows to their top-N edges with the coverage guarantee (`elias build-index --kappa N`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class PruneStats:
    kappa_before: int
    kappa_requested: int
    kappa_after: int  # requested + the most restored edges in any one row
    edges_before: int
    edges_after: int
    restored_edges: int  # labels that lost every edge and got their best one back
    labels_without_edge: int  # labels that had no edge even before pruning (unreachable either way)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@torch.no_grad()
def prune_graph(A_ids: Tensor, A_weights: Tensor, kappa: int, pad_id: int) -> tuple[Tensor, Tensor, PruneStats]:
    """Keep each row's `kappa` heaviest edges; give every label that lost all its edges its best one back.

    The restored edge goes back into its own row, appended after the kept slots (rows are widened to
    `kappa + max restored per row` and padded): no kept edge is displaced, so no other label can lose its
    last edge, and every label reachable before stays reachable. Weights are the normalised `a_cl` of the
    full row, kept as they are (not renormalised), so every surviving path scores exactly as before.
    """
    if kappa < 1:
        raise ValueError(f"--kappa must be at least 1, got {kappa}")
    C, K = A_ids.shape
    L = pad_id
    A_ids, A_weights = A_ids.cpu().long(), A_weights.cpu().float()
    is_edge = A_ids != L
    had = torch.zeros(L + 1, dtype=torch.bool)
    had[A_ids[is_edge]] = True
    if kappa >= K:
        n = int(is_edge.sum())
        return A_ids, A_weights, PruneStats(K, kappa, K, n, n, 0, int((~had[:L]).sum()))
    score = A_weights.masked_fill(~is_edge, -1.0)  # pads rank last
    top_pos = torch.topk(score, kappa, dim=1).indices
    kept_ids, kept_w = A_ids.gather(1, top_pos), A_weights.gather(1, top_pos)
    covered = torch.zeros(L + 1, dtype=torch.bool)
    covered[kept_ids] = True
    orphan = had & ~covered
    orphan[L] = False
    # Each orphan's best edge in the unpruned A (ties: the first row).
    flat = torch.nonzero(orphan[A_ids.flatten()]).squeeze(1)
    ids, w, row = A_ids.flatten()[flat], A_weights.flatten()[flat], flat // K
    order = torch.argsort(w, descending=True, stable=True)
    order = order[torch.argsort(ids[order], stable=True)]
    ids, w, row = ids[order], w[order], row[order]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[1:] = ids[1:] != ids[:-1]
    ids, w, row = ids[first], w[first], row[first]
    # Append them to their rows.
    per_row = torch.bincount(row, minlength=C)
    extra = int(per_row.max()) if len(row) else 0
    by_row = torch.argsort(row, stable=True)
    ids, w, row = ids[by_row], w[by_row], row[by_row]
    slot = torch.arange(len(row)) - (torch.cumsum(per_row, 0) - per_row)[row]
    out_ids = torch.cat([kept_ids, torch.full((C, extra), L, dtype=torch.long)], 1)
    out_w = torch.cat([kept_w, torch.zeros(C, extra)], 1)
    out_ids[row, kappa + slot] = ids
    out_w[row, kappa + slot] = w
    stats = PruneStats(
        kappa_before=K, kappa_requested=kappa, kappa_after=kappa + extra, edges_before=int(is_edge.sum()),
        edges_after=int((out_ids != L).sum()), restored_edges=len(ids), labels_without_edge=int((~had[:L]).sum()),
    )
    return out_ids, out_w, stats
