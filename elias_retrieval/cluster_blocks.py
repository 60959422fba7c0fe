"""Label logits of a training batch by cluster blocks: the stage-1 route of the label classifiers' product.

In stage 1 each cluster's row of A holds its own labels (a partition), so a row's shortlist is the labels of its
beam clusters: B x beam x kappa logits, a few percent of the dense (B, L) product. Grouping the batch's (row,
cluster) pairs by cluster makes them small GEMMs: each used cluster's kappa rows of W_L are read once, against the
embeddings of the rows that have it in their beam. Clusters are bucketed by that row count, rounded up to a power
of two, so a bucket is one batched product with at most half its rows padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from elias_retrieval.row_gather import distinct, fused_route_applies, gather_rows

_MIN_ROWS = 8  # a bucket's fewest rows per cluster: smaller products cost their call, not their arithmetic
# The block route is taken when its padded products are at most this fraction of the dense (B, L) one; above it
# (stage 2's kappa slots per cluster, tiny L) one dense GEMM is faster.
_BLOCK_FRACTION = 0.25


def block_route_pays(clusters: Tensor, kappa: int, num_labels: int) -> bool:
    """Whether scoring the beam's cluster blocks costs well under the dense (B, L) product."""
    return 2 * clusters.numel() * kappa <= _BLOCK_FRACTION * clusters.shape[0] * num_labels


def cluster_block_logits(emb: Tensor, clusters: Tensor, A_ids: Tensor, W_L: Tensor, dtype: torch.dtype) -> Tensor:
    """w_l . phi (no bias) for every slot of each row's beam clusters: (B, beam * kappa), in the order of
    `expand`'s candidates (cluster by cluster, slot by slot), float32 and differentiable in `emb` and `W_L`.

    `clusters` (B, beam) are distinct per row; pad slots of A (id L) get a logit to be masked by the caller (and
    no gradient). `dtype` is the products' input type (bf16 where the hardware has it).
    """
    B, beam = clusters.shape
    C, kappa = A_ids.shape
    device = emb.device
    flat = clusters.reshape(-1)
    P = flat.numel()
    with torch.no_grad():
        counts = torch.bincount(flat, minlength=C)
        used = counts > 0
        rows = torch.exp2(torch.ceil(torch.log2(counts.clamp(min=_MIN_ROWS).float()))).long() * used
        # Used clusters, bucket by bucket; each gets `rows` consecutive entries of the embedding table.
        cluster_order = torch.argsort(rows * C + torch.arange(C, device=device))[C - int(used.sum()):]
        bucket_rows = rows[cluster_order]
        first_row = torch.zeros(C, dtype=torch.long, device=device)
        first_row[cluster_order] = torch.cumsum(bucket_rows, 0) - bucket_rows
        pair_order = torch.argsort(flat, stable=True)
        rank = torch.arange(P, device=device) - (torch.cumsum(counts, 0) - counts)[flat[pair_order]]
        table_pos = torch.empty(P, dtype=torch.long, device=device)
        table_pos[pair_order] = first_row[flat[pair_order]] + rank  # pair p's row in the embedding table
        table = torch.zeros(int(bucket_rows.sum()), dtype=torch.long, device=device)  # padding: row 0
        table[table_pos] = torch.arange(B, device=device).repeat_interleave(beam)
        labels = A_ids.index_select(0, cluster_order).reshape(-1)
        sizes, n_clusters = torch.unique_consecutive(bucket_rows, return_counts=True)
    counts_c, counts_r = n_clusters.tolist(), (sizes * n_clusters).tolist()
    label_parts = labels.split([n * kappa for n in counts_c])
    # Each used cluster's labels once, as one piece per bucket.
    if (W_L.requires_grad and torch.is_grad_enabled() and fused_route_applies(W_L, dtype)
            and distinct(labels, W_L.shape[0])):
        W_parts = gather_rows(W_L, list(label_parts), dtype)  # training under a partition: one pass each way
    else:
        # Cast on the narrower side: a wide W_L (fp32 to bf16) is cast first, a compact one (an index's fp16 or
        # int8, widened to fp32) only in its gathered rows.
        labels = torch.where(labels >= W_L.shape[0], torch.zeros_like(labels), labels)
        if W_L.element_size() > torch.empty((), dtype=dtype).element_size():
            W = W_L.to(dtype).index_select(0, labels)
        else:
            W = W_L.index_select(0, labels).to(dtype)
        W_parts = W.split([n * kappa for n in counts_c])  # split, not slicing: a slice's backward fills a zero
        # tensor of the whole input per slice
    E = emb.to(dtype).index_select(0, table)
    d = emb.shape[1]
    out = [torch.bmm(e.view(n, -1, d), w.view(n, kappa, d).transpose(1, 2)).view(-1, kappa)
           for e, w, n in zip(E.split(counts_r), W_parts, counts_c, strict=True)]
    return torch.cat(out).float().index_select(0, table_pos).view(B, beam * kappa)
