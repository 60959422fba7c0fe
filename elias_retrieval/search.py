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
    B = clusters.shape[0]
    ids = A_ids[clusters].reshape(B, -1)
    path = (s.unsqueeze(-1) * A_weights[clusters]).reshape(B, -1)
    return ids, path


@torch.no_grad()
def best_paths(cand_ids: Tensor, cand_path: Tensor, k: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Step 4: positions (B, k) into the candidates of the top-k distinct labels by best path.

    A label reached through several clusters keeps its best path. Returns (positions, valid); `valid`
    is False where fewer than k distinct labels were reachable.
    """
    # Sort by path (best first), then stably by label id: the first of each run of equal ids is its best path.
    by_path = torch.argsort(cand_path, dim=1, descending=True)
    ids_by_path = cand_ids.gather(1, by_path)
    ids_sorted, by_id = torch.sort(ids_by_path, dim=1, stable=True)
    first = torch.ones_like(ids_sorted, dtype=torch.bool)
    first[:, 1:] = ids_sorted[:, 1:] != ids_sorted[:, :-1]
    first &= ids_sorted != pad_id
    keep = torch.zeros_like(first).scatter_(1, by_id, first)  # back to path order
    rank_score = torch.where(keep, cand_path.gather(1, by_path), torch.full_like(cand_path, -1.0))
    k = min(k, rank_score.shape[1])
    top_score, top = torch.topk(rank_score, k, dim=1)
    return by_path.gather(1, top), top_score >= 0


def label_logits(emb: Tensor, ids: Tensor, W_L: Tensor, b_L: Tensor, W_L_scale: Tensor | None = None) -> Tensor:
    """w_l . phi + b_l for the (B, K) label ids (pad ids must be replaced by a valid id first)."""
    L = W_L.shape[0]
    if ids.numel() * _DENSE_LABELS_FACTOR >= ids.shape[0] * L:
        full = emb @ W_L.to(emb.dtype).T  # few labels: one GEMM beats a gather of B*K rows
        if W_L_scale is not None:
            full = full * W_L_scale
        return full.gather(1, ids) + b_L[ids]
    rows = W_L[ids].to(emb.dtype)  # (B, K, d): only the shortlisted rows are converted
    z = torch.bmm(rows, emb.unsqueeze(-1)).squeeze(-1)
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
    s = cluster_scores(emb @ t.W_C.T + t.b_C, t.alpha)
    L = t.num_labels
    ids, path, cluster, valid = shortlist(s, t.A_ids, t.A_weights, beam_size, max(shortlist_size, k), L)
    safe_ids = torch.where(valid, ids, torch.zeros_like(ids)).clamp_(max=L - 1)
    prob = torch.sigmoid(label_logits(emb, safe_ids, t.W_L, t.b_L, t.W_L_scale))
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
