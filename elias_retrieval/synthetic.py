"""Synthetic ELIAS search tensors whose right answers are known, for tests and scale benchmarks.

Structure: `C` unit cluster centroids (consecutive clusters share a group direction, so cluster `c + 1` is a
true neighbour of `c`); every label belongs to one cluster (balanced) and its classifier points near its
centroid. Row `c` of `A` holds its own members first (weight 1), then the members of clusters `c + 1, c + 2,
...` up to `kappa` slots (weight decaying with the distance). A query drawn near label `l`'s classifier
(`synthetic_queries`) has `l` as its right answer: its cluster wins the beam and `l` wins the ranking.

Vectorised throughout: a million labels at d = 256 take a few seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from elias_retrieval.search import SearchTensors

_GROUP = 16  # consecutive clusters sharing a direction
_CLUSTER_SCALE = 16.0  # W_C logits = scale * cos
_LABEL_SCALE = 8.0  # W_L logits = scale * cos + bias
_LABEL_BIAS = -4.0
_BANK = 8192  # random directions combined into each label's noise


def default_num_clusters(num_labels: int, cluster_size: int = 100) -> int:
    """C = 2^ceil(log2(L / 100)) (ELIAS.md), at least 2."""
    return max(2, 2 ** math.ceil(math.log2(max(num_labels, 2) / cluster_size)))


def cluster_of_labels(num_labels: int, num_clusters: int, seed: int = 0) -> Tensor:
    """The (balanced, shuffled) cluster of every label, as `synthetic_tensors` assigns them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_labels, generator=g) % num_clusters


@torch.no_grad()
def synthetic_tensors(
    num_labels: int,
    dim: int = 256,
    kappa: int = 1000,
    num_clusters: int | None = None,
    seed: int = 0,
    noise: float = 0.5,
    dtype: str = "fp16",
) -> SearchTensors:
    """Search tensors for `num_labels` labels (A_ids int64, A_weights normalised, W_L and W_C in `dtype`:
    fp32|fp16, as an index built with that dtype stores them).

    `noise` is the spread of a label's classifier around its centroid (0 = on it); at 0.5 a label's cosine
    to its own centroid is about 0.9 and to a sibling label about 0.8.
    """
    L, d = num_labels, dim
    C = num_clusters or default_num_clusters(L)
    kappa = min(kappa, L)
    g = torch.Generator().manual_seed(seed)
    groups = F.normalize(torch.randn(-(-C // _GROUP), d, generator=g), dim=1)
    centroids = F.normalize(0.65 * groups.repeat_interleave(_GROUP, 0)[:C] + F.normalize(
        torch.randn(C, d, generator=g), dim=1), dim=1)
    cluster = cluster_of_labels(L, C, seed)
    storage = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    W_L = _label_vectors(centroids, cluster, noise, g, storage)
    # Labels sorted by cluster: cluster c's members, then c+1's, ... Row c takes kappa consecutive entries
    # starting at its own block (wrapping around), so it holds its members, then its neighbours'.
    order = torch.sort(cluster, stable=True).indices
    counts = torch.bincount(cluster, minlength=C)
    start = torch.cumsum(counts, 0) - counts
    pos = (start.unsqueeze(1) + torch.arange(kappa)).remainder_(L)  # (C, kappa) positions in `order`
    A_ids = order[pos]
    # Distance in clusters from the row's own cluster: 0 for members, 1 for cluster c+1, ...
    hop = (cluster[A_ids] - torch.arange(C).unsqueeze(1)).remainder_(C)
    A_weights = torch.where(hop == 0, torch.ones(()), 0.5 * 0.8 ** (hop.float() - 1))
    return SearchTensors(
        W_C=(centroids * _CLUSTER_SCALE).to(storage),
        b_C=torch.zeros(C),
        A_ids=A_ids,
        A_weights=A_weights.float(),
        W_L=W_L,
        b_L=torch.full((L,), _LABEL_BIAS),
        alpha=10.0,
    )


def _label_vectors(centroids: Tensor, cluster: Tensor, noise: float, g: torch.Generator, dtype: torch.dtype) -> Tensor:
    """W_L rows: normalize(centroid + noise * n_l) * scale, written chunk by chunk straight into `dtype`.

    n_l = (bank[l % B] + bank[(l // B) % B]) / sqrt(2) from a bank of B random directions: distinct for every
    label up to B^2, and 100x cheaper than a fresh Gaussian per label.
    """
    L, d = cluster.shape[0], centroids.shape[1]
    B = min(_BANK, max(1, L))
    bank = torch.randn(B, d, generator=g) * (noise / math.sqrt(2 * d))
    out = torch.empty(L, d, dtype=dtype)
    step = 1 << 15
    for a in range(0, L, step):
        ids = torch.arange(a, min(L, a + step))
        w = centroids.index_select(0, cluster[ids]).add_(bank.index_select(0, ids % B))
        w.add_(bank.index_select(0, (ids // B) % B))
        out[a : a + len(ids)] = w.mul_(_LABEL_SCALE / w.norm(dim=1, keepdim=True))
    return out


@torch.no_grad()
def synthetic_queries(t: SearchTensors, n: int, seed: int = 0, noise: float = 0.3) -> tuple[Tensor, Tensor]:
    """`n` query embeddings (n, d) float32, each near one label's classifier, and that label's id (n,).

    With the defaults the label is the top-1 answer of `search` for almost every query.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, t.num_labels, (n,), generator=g)
    w = t.W_L[labels].float()  # rows; labels_of gives their label ids (an index stores rows in cluster order)
    if t.W_L_scale is not None:
        w = w * t.W_L_scale[labels].unsqueeze(1)
    q = F.normalize(w, dim=1) + torch.randn(n, t.dim, generator=g) * (noise / math.sqrt(t.dim))
    return F.normalize(q, dim=1), t.labels_of(labels)


def write_synthetic_index(
    out: str | Path,
    num_labels: int,
    dim: int = 256,
    kappa: int = 1000,
    num_clusters: int | None = None,
    seed: int = 0,
    dtype: str = "fp16",
    defaults: dict[str, int] | None = None,
) -> Path:
    """Write `synthetic_tensors` as an index directory at `out` (atomically) that `elias serve` can serve.

    It has no encoder (embedding queries only) and label ids "0" .. "L-1". W_L is generated straight in fp16
    for an fp16 or int8 index, so 1M labels at d = 256 need about 1 GB of memory while writing.
    """
    from elias_retrieval.data import LabelVocab
    from elias_retrieval.index_format import write_index

    t = synthetic_tensors(num_labels, dim=dim, kappa=kappa, num_clusters=num_clusters, seed=seed,
                          dtype="fp32" if dtype == "fp32" else "fp16")
    labels = LabelVocab([str(i) for i in range(num_labels)])
    meta = {"synthetic": {"num_labels": num_labels, "dim": dim, "kappa": int(t.A_ids.shape[1]), "seed": seed}}
    write_index(out, t, labels, None, dtype=dtype, defaults=defaults or {"k": 100, "beam_size": 20,
                                                                          "shortlist_size": 2000}, meta=meta)
    return Path(out)
