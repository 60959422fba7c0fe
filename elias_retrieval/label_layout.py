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


def is_permutation(ids: Tensor, n: int) -> bool:
    """Whether `ids` is a permutation of 0..n-1 (any shape, dtype or values given)."""
    ids = ids.long().reshape(-1)
    if ids.numel() != n or (n and (int(ids.min()) < 0 or int(ids.max()) >= n)):
        return False
    return bool((torch.bincount(ids, minlength=n) == 1).all())


def rows_of(order: Tensor) -> Tensor:
    """The inverse of `order`, with one extra entry mapping the pad id L to itself: row of each label id."""
    L = order.shape[0]
    inv = torch.empty(L + 1, dtype=torch.long)
    inv[order] = torch.arange(L)
    inv[L] = L
    return inv


def relabel_rows(A_ids: Tensor, order: Tensor) -> Tensor:
    """A's ids (rows of some tensors; pad id L) as rows of those tensors permuted by `order`, in A_ids's dtype."""
    inv = rows_of(order.cpu().long()).to(A_ids.device)
    return inv.index_select(0, A_ids.reshape(-1).long()).view(A_ids.shape).to(A_ids.dtype)


def _permuted(t: SearchTensors, order: Tensor, row_labels: Tensor | None) -> SearchTensors:
    """`t` with row r holding row order[r] of `t`, and the given `row_labels`."""
    order = order.to(t.W_L.device)
    return dataclasses.replace(
        t,
        A_ids=relabel_rows(t.A_ids, order),
        W_L=t.W_L.index_select(0, order),
        b_L=t.b_L.index_select(0, order),
        W_L_scale=None if t.W_L_scale is None else t.W_L_scale.index_select(0, order),
        row_labels=row_labels,
    )


@torch.no_grad()
def in_label_order(t: SearchTensors) -> SearchTensors:
    """`t` with row l holding label l again (`t` itself when it already does)."""
    if t.row_labels is None:
        return t
    return _permuted(t, rows_of(t.row_labels.cpu().long())[: t.num_labels], None)


@torch.no_grad()
def in_cluster_order(t: SearchTensors) -> SearchTensors:
    """A copy of `t` with its labels stored in cluster order (search returns the same label ids and scores)."""
    L = t.num_labels
    row_labels = None if t.row_labels is None else t.row_labels.cpu().long()
    order = cluster_order(t.A_ids.cpu(), t.A_weights.cpu(), L, row_labels)
    labels = order if row_labels is None else row_labels.index_select(0, order)
    return _permuted(t, order, labels.to(t.W_L.device))
