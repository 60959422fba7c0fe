"""ELIAS search in five steps (ELIAS.md, "Search"), as pure tensor code.

    1. encode            phi(x)                                  (the caller; see encoders.py)
    2. score clusters    s_c = min(1, alpha * softmax(W_C phi + b_C)); keep the top `beam`
    3. expand            each beam cluster to its kappa slots of A: path = s_c * a_cl
    4. shortlist         keep each label's best path; the top `shortlist_size` labels by path
    5. rank              final = path * sigmoid(w_l . phi + b_l) on the shortlist; the top k

The same functions serve training (with teacher forcing and gradients), offline evaluation and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Past this many candidates per query, dense label scoring beats gathering W_L rows (see label_logits).
_DENSE_LABELS_FACTOR = 4


@dataclass
class SearchTensors:
    """Everything the search reads. `A_weights` are already normalised (pad slots 0, pad id = L)."""

    W_C: Tensor  # (C, d) float32
    b_C: Tensor  # (C,)
    A_ids: Tensor  # (C, kappa) int64, pad = L
    A_weights: Tensor  # (C, kappa) float32 in [0, 1]
    W_L: Tensor  # (L, d) float32 | float16 | int8
    b_L: Tensor  # (L,) float32
    alpha: float
    W_L_scale: Tensor | None = None  # (L,) float32, only for int8 W_L

    @property
    def num_labels(self) -> int:
        return self.W_L.shape[0]

    @property
    def num_clusters(self) -> int:
        return self.W_C.shape[0]

    @property
    def dim(self) -> int:
        return self.W_C.shape[1]

    def to(self, device: torch.device | str) -> SearchTensors:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return SearchTensors(
            mv(self.W_C), mv(self.b_C), mv(self.A_ids), mv(self.A_weights), mv(self.W_L), mv(self.b_L),
            self.alpha, mv(self.W_L_scale),
        )  # type: ignore[arg-type]


@dataclass
class SearchResult:
    """Top-k per query; `ids` is -1 and scores 0 where fewer than k labels were reachable."""

    ids: Tensor  # (B, k) int64
    scores: Tensor  # (B, k) final scores
    path: Tensor  # (B, k) best path score s_c * a_cl
    label_prob: Tensor  # (B, k) sigmoid(w_l . phi + b_l)
    cluster: Tensor  # (B, k) the cluster that gave the best path


def cluster_scores(cluster_logits: Tensor, alpha: float) -> Tensor:
    """s_c = min(1, alpha * softmax_c(logits))."""
    return torch.clamp(alpha * torch.softmax(cluster_logits, dim=-1), max=1.0)


def edge_weights(A_logits: Tensor, A_ids: Tensor, pad_id: int, beta: float) -> Tensor:
    """a_cl = min(1, beta * softmax over the row's non-pad slots); pad slots get 0."""
    pad = A_ids == pad_id
    w = torch.softmax(A_logits.masked_fill(pad, float("-inf")), dim=-1)
    return torch.clamp(beta * torch.nan_to_num(w, nan=0.0), max=1.0).masked_fill(pad, 0.0)


def expand(clusters: Tensor, s: Tensor, A_ids: Tensor, A_weights: Tensor) -> tuple[Tensor, Tensor]:
    """Step 3: (B, b) clusters with scores -> (B, b*kappa) candidate label ids and path scores."""
    B, flat = clusters.shape[0], clusters.reshape(-1)
    ids = A_ids.index_select(0, flat).reshape(B, -1)
    path = (s.unsqueeze(-1) * A_weights.index_select(0, flat).view(*clusters.shape, -1)).reshape(B, -1)
    return ids, path


@torch.no_grad()
def best_paths(cand_ids: Tensor, cand_path: Tensor, k: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Step 4: positions (B, k) into the candidates of the top-k distinct labels by best path.

    A label reached through several clusters keeps its best path. Returns (positions, valid); `valid`
    is False where fewer than k distinct labels were reachable.

    Exact, and cheap when b*kappa >> k: take the top m >= k candidates by path, dedupe only those, and
    widen m only for batches where some row has fewer than k distinct labels among its top m (the k best
    distinct labels of the top m are then the k best overall: every path left out is no better).
    """
    B, N = cand_ids.shape
    k = min(k, N)
    score = cand_path.masked_fill(cand_ids == pad_id, -1.0)  # pad slots rank last and are never kept
    m = min(N, k + max(k // 4, 64))
    while True:
        top_score, top_pos = torch.topk(score, m, dim=1)  # best first
        ids_sorted, by_id = torch.sort(cand_ids.gather(1, top_pos), dim=1, stable=True)
        first = torch.ones_like(ids_sorted, dtype=torch.bool)
        first[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]  # first of a run of equal ids = its best path
        keep = torch.zeros_like(first).scatter_(1, by_id, first) & (top_score >= 0)
        if m == N or bool((keep.sum(1) >= k).all()):
            break
        m = min(N, 2 * m)
    # The kept candidates are already in path order: the first k of each row, compacted to the left.
    rank = keep.cumsum(1) - 1
    rows, cols = torch.nonzero(keep & (rank < k), as_tuple=True)
    pos = torch.zeros(B, k, dtype=top_pos.dtype, device=top_pos.device)
    valid = torch.zeros(B, k, dtype=torch.bool, device=top_pos.device)
    pos[rows, rank[rows, cols]] = top_pos[rows, cols]
    valid[rows, rank[rows, cols]] = True
    return pos, valid


def label_logits(emb: Tensor, ids: Tensor, W_L: Tensor, b_L: Tensor, W_L_scale: Tensor | None = None) -> Tensor:
    """w_l . phi + b_l for the (B, K) label ids (pad ids must be replaced by a valid id first).

    Only the shortlisted rows of a compact (fp16/int8) W_L are converted, to `emb`'s dtype. Without
    gradients on the CPU the work is bound by memory, not arithmetic: each query's K rows are gathered
    into one reused buffer that stays in cache and multiplied there (a GEMV), which measured 5-10x faster
    than one batched product over (B, K, d) gathered rows.
    """
    L = W_L.shape[0]
    if ids.numel() * _DENSE_LABELS_FACTOR >= ids.shape[0] * L:
        full = emb @ W_L.to(emb.dtype).T  # few labels: one GEMM beats a gather of B*K rows
        if W_L_scale is not None:
            full = full * W_L_scale
        return full.gather(1, ids) + b_L[ids]
    B, K = ids.shape
    if emb.is_cuda or (torch.is_grad_enabled() and (emb.requires_grad or W_L.requires_grad)):
        rows = W_L[ids].to(emb.dtype)  # (B, K, d)
        z = torch.bmm(rows, emb.unsqueeze(-1)).squeeze(-1)
    else:
        z = torch.empty(B, K, dtype=emb.dtype, device=emb.device)
        gathered = torch.empty(K, W_L.shape[1], dtype=W_L.dtype, device=emb.device)
        rows = gathered if W_L.dtype == emb.dtype else torch.empty(K, W_L.shape[1], dtype=emb.dtype)
        for i in range(B):
            torch.index_select(W_L, 0, ids[i], out=gathered)
            if rows is not gathered:
                rows.copy_(gathered)
            torch.mv(rows, emb[i], out=z[i])
    if W_L_scale is not None:
        z = z * W_L_scale[ids]
    return z + b_L[ids]


def shortlist(
    s: Tensor,
    A_ids: Tensor,
    A_weights: Tensor,
    beam_size: int,
    shortlist_size: int,
    pad_id: int,
    forced_clusters: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 2-4: shortlisted label ids, their path scores, the cluster of each path, and a validity mask.

    `forced_clusters` (B, C) bool marks clusters that must be in the beam (teacher forcing in training).
    Gradients flow into `s` and `A_weights` through the returned path scores.
    """
    C = s.shape[1]
    select = s.detach()
    width = min(beam_size, C)
    if forced_clusters is not None:
        select = torch.where(forced_clusters, select + 2.0, select)  # scores are <= 1: forced ones rank first
        width = min(C, beam_size + int(forced_clusters.sum(1).max().item()))
    clusters = torch.topk(select, width, dim=1).indices
    cand_ids, cand_path = expand(clusters, s.gather(1, clusters), A_ids, A_weights)
    pos, valid = best_paths(cand_ids, cand_path.detach(), shortlist_size, pad_id)
    ids = cand_ids.gather(1, pos)
    path = cand_path.gather(1, pos) * valid
    kappa = A_ids.shape[1]
    cluster = clusters.gather(1, pos // kappa)
    return ids, path, cluster, valid


@torch.inference_mode()
def search(
    emb: Tensor,
    t: SearchTensors,
    k: int = 100,
    beam_size: int = 20,
    shortlist_size: int = 2000,
) -> SearchResult:
    """The five steps for a batch of query embeddings `emb` (B, d). Plain arrays in, plain arrays out."""
    emb = emb.to(t.W_C.device, torch.float32)
    # W_C and W_L may be stored in half precision: on CUDA the products run in it; on the CPU (slow half
    # GEMM) keep W_C in fp32 and convert only the shortlisted W_L rows.
    half = emb.is_cuda and t.W_L.dtype in (torch.float16, torch.bfloat16)
    s = cluster_scores(torch.addmm(t.b_C.to(t.W_C.dtype), emb.to(t.W_C.dtype), t.W_C.T).float(), t.alpha)
    L = t.num_labels
    ids, path, cluster, valid = shortlist(s, t.A_ids, t.A_weights, beam_size, max(shortlist_size, k), L)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids)).clamp_(max=L - 1)
    z = label_logits(emb.to(t.W_L.dtype) if half else emb, safe_ids, t.W_L, t.b_L, t.W_L_scale)
    prob = torch.sigmoid(z.float())
    final = torch.where(valid, path * prob, torch.full_like(path, -1.0))
    k = min(k, final.shape[1])
    scores, top = torch.topk(final, k, dim=1)
    ok = scores >= 0
    pick = lambda x: torch.where(ok, x.gather(1, top), torch.zeros_like(x.gather(1, top)))  # noqa: E731
    return SearchResult(
        ids=torch.where(ok, ids.gather(1, top), torch.full_like(top, -1)),
        scores=pick(final),
        path=pick(path),
        label_prob=pick(prob),
        cluster=torch.where(ok, cluster.gather(1, top), torch.full_like(top, -1)),
    )
