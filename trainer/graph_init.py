"""Initialising the sparse graph A for stage 2 from a stage-1 model (ELIAS.md), with guaranteed coverage."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def cluster_affinity(
    cluster_top_ids: np.ndarray, cluster_top_scores: np.ndarray, Y: sp.csr_matrix, C: int
) -> sp.csr_matrix:
    """Y^T M: for each label and cluster, the summed cluster score over the label's positives. (L, C)."""
    N, t = cluster_top_ids.shape
    M = sp.csr_matrix(
        (cluster_top_scores.ravel().astype(np.float32), cluster_top_ids.ravel(), np.arange(0, N * t + 1, t)),
        shape=(N, C),
    )
    return (Y.T.tocsr().astype(np.float32) @ M).tocsr()


def init_graph(
    affinity: sp.csr_matrix, partition: list[np.ndarray], kappa: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cluster row keeps its top-`kappa` labels by affinity; logits = log(affinity).

    Coverage: every label first gets one mandatory edge, to its best cluster by affinity (or its stage-1
    partition cluster when it has no affinity, or when its best cluster's row is already full of
    mandatory edges). Rows are then filled with the strongest remaining edges. Returns (A_ids, A_logits)
    with pad id L and pad logits -inf.
    """
    L, C = affinity.shape
    part_of = np.empty(L, dtype=np.int64)
    for c, members in enumerate(partition):
        part_of[members] = c
    if max(len(m) for m in partition) > kappa:
        raise ValueError(f"kappa={kappa} is smaller than the largest stage-1 cluster")
    A = affinity.tocoo()
    lab, clu, w = A.row.astype(np.int64), A.col.astype(np.int64), A.data.astype(np.float64)

    # Mandatory edge per label: its best cluster, falling back to its partition cluster on overflow.
    best = np.full(L, -1, dtype=np.int64)
    best_w = np.zeros(L)
    order = np.lexsort((-w, lab))  # by label, strongest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = lab[order][1:] != lab[order][:-1]
    best[lab[order][first]] = clu[order][first]
    best_w[lab[order][first]] = w[order][first]
    mandatory = np.where(best >= 0, best, part_of)
    # Rows over capacity keep their strongest mandatory labels; the rest go to their partition cluster.
    counts = np.bincount(mandatory, minlength=C)
    for c in np.flatnonzero(counts > kappa):
        labs = np.flatnonzero(mandatory == c)
        labs = labs[np.argsort(-best_w[labs], kind="stable")]
        mandatory[labs[kappa:]] = part_of[labs[kappa:]]
    # A partition row can still overflow if other labels' best cluster is also it: then widen A.
    kappa = max(kappa, int(np.bincount(mandatory, minlength=C).max()))

    ids = np.full((C, kappa), L, dtype=np.int64)
    logits = np.full((C, kappa), -np.inf, dtype=np.float32)
    aff = affinity.tocsc()
    floor = w.min() if len(w) else 1.0
    for c in range(C):
        col = aff.getcol(c).tocoo()
        cand_l, cand_w = col.row.astype(np.int64), col.data.astype(np.float64)
        must = np.flatnonzero(mandatory == c)
        must_w = np.full(len(must), floor * 0.5)
        if len(cand_l):
            pos = np.searchsorted(cand_l, must)
            pos = np.minimum(pos, len(cand_l) - 1)
            hit = cand_l[pos] == must
            must_w[hit] = cand_w[pos[hit]]
        rest = ~np.isin(cand_l, must)
        free = kappa - len(must)
        top = np.argsort(-cand_w[rest], kind="stable")[:free]
        row_l = np.concatenate([must, cand_l[rest][top]])
        row_w = np.concatenate([must_w, cand_w[rest][top]])
        ids[c, : len(row_l)] = row_l
        logits[c, : len(row_l)] = np.log(np.maximum(row_w, 1e-12))
    return torch.from_numpy(ids), torch.from_numpy(logits)


def coverage(A_ids: torch.Tensor, num_labels: int) -> np.ndarray:
    """Boolean (L,): which labels have at least one edge in A."""
    ids = A_ids.flatten().numpy()
    ids = ids[ids < num_labels]
    out = np.zeros(num_labels, dtype=bool)
    out[ids] = True
    return out
