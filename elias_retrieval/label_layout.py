"""Label storage order: the labels of each cluster side by side, clusters in id order (like faiss's IVF lists).

Search reads, for each query, the A rows of its beam clusters and then the W_L rows of the labels they
shortlist. Stored in label-id order those W_L rows are scattered over the whole matrix: each is a DRAM (and
often TLB) miss. Stored by home cluster they sit in a few runs: a beam cluster's own labels are contiguous,
and stage 0's recursive bisection numbers sibling clusters consecutively, so the other labels of its row
of A mostly live in nearby clusters, and so nearby in memory.

A label's home is the cluster whose row of A gives it its largest edge weight (ties: the lowest cluster id);
labels on no row of A go last. Within a cluster labels keep their id order. The order is a permutation
`row_labels` (row r holds label row_labels[r]); A's ids are rewritten as rows, and search maps its results
back to label ids (SearchTensors.labels_of).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from elias_retrieval.search import SearchTensors


@torch.no_grad()
def home_clusters(A_ids: Tensor, A_weights: Tensor, num_labels: int) -> Tensor:
    """(L,) int64: each label's home cluster, C for a label that no row of A holds."""
    C, kappa = A_ids.shape
    ids = A_ids.reshape(-1).long()
    w = A_weights.reshape(-1).float()
    real = ids < num_labels  # pad slots hold id L
    best = torch.full((num_labels + 1,), -1.0).scatter_reduce_(0, ids, w, "amax")
    cluster = torch.arange(C).repeat_interleave(kappa)
    at_best = torch.where(real & (w == best.index_select(0, ids)), cluster, C)
    return torch.full((num_labels + 1,), C, dtype=torch.long).scatter_reduce_(0, ids, at_best, "amin")[:num_labels]


def cluster_order(A_ids: Tensor, A_weights: Tensor, num_labels: int, row_labels: Tensor | None = None) -> Tensor:
    """(L,) int64: the rows in storage order, sorted by home cluster, then by label id (`row_labels[row]`;
    None: row = label id). The order is the same however the given rows were ordered."""
    home = home_clusters(A_ids, A_weights, num_labels)
    if row_labels is None:
        return torch.sort(home, stable=True).indices
    by_label = rows_of(row_labels.long())[:num_labels]
    return by_label.index_select(0, torch.sort(home.index_select(0, by_label), stable=True).indices)


def rows_of(order: Tensor) -> Tensor:
    """The inverse of `order`, with one extra entry mapping the pad id L to itself: row of each label id."""
    L = order.shape[0]
    inv = torch.empty(L + 1, dtype=torch.long)
    inv[order] = torch.arange(L)
    inv[L] = L
    return inv


@torch.no_grad()
def in_label_order(t: SearchTensors) -> SearchTensors:
    """`t` with row l holding label l again (`t` itself when it already does)."""
    if t.row_labels is None:
        return t
    L = t.num_labels
    rows = rows_of(t.row_labels.cpu().long())  # the row of each label id, and L -> L
    dev = t.W_L.device
    by_label = rows[:L].to(dev)
    return dataclasses.replace(
        t,
        A_ids=t.row_labels.long().to(dev).index_select(
            0, t.A_ids.reshape(-1).long().clamp(max=L - 1)).where(t.A_ids.reshape(-1) < L, L).view(
            t.A_ids.shape).to(t.A_ids.dtype),
        W_L=t.W_L.index_select(0, by_label),
        b_L=t.b_L.index_select(0, by_label),
        W_L_scale=None if t.W_L_scale is None else t.W_L_scale.index_select(0, by_label),
        row_labels=None,
    )


@torch.no_grad()
def in_cluster_order(t: SearchTensors) -> SearchTensors:
    """A copy of `t` with its labels stored in cluster order (search returns the same label ids and scores)."""
    L = t.num_labels
    order = cluster_order(t.A_ids.cpu(), t.A_weights.cpu(), L, None if t.row_labels is None else t.row_labels.cpu())
    inv = rows_of(order)
    dev = t.W_L.device
    order_dev = order.to(dev)
    base = torch.arange(L, device=dev) if t.row_labels is None else t.row_labels.long()
    return dataclasses.replace(
        t,
        A_ids=inv.to(dev).index_select(0, t.A_ids.reshape(-1).long()).view(t.A_ids.shape).to(t.A_ids.dtype),
        W_L=t.W_L.index_select(0, order_dev),
        b_L=t.b_L.index_select(0, order_dev),
        W_L_scale=None if t.W_L_scale is None else t.W_L_scale.index_select(0, order_dev),
        row_labels=base.index_select(0, order_dev),
    )
