"""The ELIAS model (ELIAS.md, "The model"): encoder phi, cluster classifiers W_C, graph A, label classifiers W_L."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elias_retrieval.cluster_blocks import block_route_pays, cluster_block_logits
from elias_retrieval.config import ModelConfig
from elias_retrieval.encoders import Encoder
from elias_retrieval.search import (
    SearchTensors,
    batch_label_logits,
    cluster_scores,
    edge_weights,
    shortlist_positions,
)

_EPS = 1e-6


# A batch marks its positives in a dense (B, L + 1) table up to this many elements (64 MB), else by sorted keys.
_DENSE_POSITIVES_ELEMENTS = 1 << 26


def positive_mask(ids: Tensor, pos_rows: Tensor, pos_labels: Tensor, num_labels: int) -> Tensor:
    """(B, K) bool: whether (row, ids[row, j]) is one of the (pos_rows, pos_labels) pairs; ids may hold the pad id
    `num_labels`. A table of the batch's rows by the labels, marked and gathered from, is 20x faster than the
    binary search of the keys (B = 256, K = 2,000, 4k labels) where it fits."""
    B, stride = ids.shape[0], num_labels + 1
    if B * stride <= _DENSE_POSITIVES_ELEMENTS:
        table = torch.zeros(B, stride, dtype=torch.bool, device=ids.device)
        table[pos_rows, pos_labels] = True
        return table.gather(1, ids)
    pos_keys = torch.sort(pos_rows * stride + pos_labels).values
    keys = torch.arange(B, device=ids.device).unsqueeze(1) * stride + ids
    return _member(keys, pos_keys)


def _member(keys: Tensor, sorted_keys: Tensor) -> Tensor:
    """keys in sorted_keys, by binary search: 3x faster than torch.isin here (which sorts both) for a batch's
    few positives against its B x K shortlist."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    at = torch.searchsorted(sorted_keys, keys).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[at] == keys


class EliasModel(nn.Module):
    """Stage 1: A is the binary partition (a = 1 on members). Stage 2: A's logits are learned."""

    def __init__(self, encoder: Encoder, num_labels: int, num_clusters: int, kappa: int, cfg: ModelConfig):
        super().__init__()
        d = encoder.dim
        self.encoder = encoder
        self.cfg = cfg
        self.num_labels, self.num_clusters = num_labels, num_clusters
        self.dropout = nn.Dropout(max(0.0, cfg.embed_dropout))  # -1 (by passes) is set per stage by the trainer
        self.W_C = nn.Parameter(torch.randn(num_clusters, d) * d**-0.5)
        self.b_C = nn.Parameter(torch.zeros(num_clusters))
        self.W_L = nn.Parameter(torch.randn(num_labels, d) * d**-0.5)
        self.b_L = nn.Parameter(torch.zeros(num_labels))
        self.A_logits = nn.Parameter(torch.zeros(num_clusters, kappa))
        self.register_buffer("A_ids", torch.full((num_clusters, kappa), num_labels, dtype=torch.long))
        self.register_buffer("label_parent", torch.zeros(num_labels, dtype=torch.long))
        self.register_buffer("stage", torch.tensor(1, dtype=torch.long))

    @property
    def kappa(self) -> int:
        return self.A_ids.shape[1]

    def set_partition(self, clusters: list[list[int]] | list) -> None:
        """Stage 1: A = the partition (each label in exactly one cluster), a_cl = 1."""
        width = max(len(c) for c in clusters)
        ids = torch.full((self.num_clusters, width), self.num_labels, dtype=torch.long)
        for c, members in enumerate(clusters):
            ids[c, : len(members)] = torch.as_tensor(members, dtype=torch.long)
        self.set_graph(ids, torch.zeros(ids.shape), stage=1)

    def set_graph(self, A_ids: Tensor, A_logits: Tensor, stage: int) -> None:
        dev = self.W_C.device
        self.A_ids = A_ids.to(dev, torch.long)
        self.A_logits = nn.Parameter(A_logits.to(dev, torch.float32))
        self.stage.fill_(stage)
        self.update_parents()

    def edge_weights(self) -> Tensor:
        if int(self.stage) == 1:
            return (self.A_ids != self.num_labels).float()
        return edge_weights(self.A_logits, self.A_ids, self.num_labels, self.cfg.beta)

    @torch.no_grad()
    def update_parents(self) -> None:
        """Each label's parent (for teacher forcing) is its best cluster, argmax_c a_cl."""
        w = self.edge_weights().flatten()
        ids = self.A_ids.flatten()
        best = torch.full((self.num_labels + 1,), -1.0, device=w.device).scatter_reduce(
            0, ids, w, reduce="amax", include_self=True
        )
        is_best = (w == best[ids]) & (ids != self.num_labels)
        cluster_of_slot = torch.arange(self.num_clusters, device=w.device).repeat_interleave(self.kappa)
        parent = torch.zeros(self.num_labels + 1, dtype=torch.long, device=w.device)
        parent[ids[is_best]] = cluster_of_slot[is_best]
        self.label_parent = parent[: self.num_labels]

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        return self.dropout(self.encoder(batch))

    def loss(self, batch: dict[str, Tensor], pos_rows: Tensor, pos_labels: Tensor, lam: float,
             matmul_dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict]:
        """Two-term ELIAS loss on a teacher-forced shortlist.

        `pos_rows`, `pos_labels`: the (row, label) pairs of the batch's positives (labels < L). `matmul_dtype`:
        the input type of the label classifiers' product (bf16 where the hardware runs it fast; precision.py).
        """
        emb = self.embed(batch)
        B = emb.shape[0]
        s = cluster_scores(emb @ self.W_C.T + self.b_C, self.cfg.alpha)
        forced = torch.zeros(B, self.num_clusters, dtype=torch.bool, device=emb.device)
        forced[pos_rows, self.label_parent[pos_labels]] = True
        partition = int(self.stage) == 1
        clusters, cand_ids, cand_path, pos, valid = shortlist_positions(
            s, self.A_ids, self.edge_weights(), self.cfg.beam_size, self.cfg.shortlist_size, self.num_labels, forced,
            partition=partition,
        )
        ids = cand_ids.gather(1, pos)
        path = cand_path.gather(1, pos) * valid
        safe_ids = torch.where(valid, ids, torch.zeros_like(ids))
        if partition and block_route_pays(clusters, self.kappa, self.num_labels):
            z = cluster_block_logits(emb, clusters, self.A_ids, self.W_L, matmul_dtype).gather(1, pos)
            z = z + self.b_L.index_select(0, safe_ids.reshape(-1)).view_as(ids)
        else:
            z = batch_label_logits(emb, safe_ids, self.W_L, self.b_L, matmul_dtype)
        y = positive_mask(ids, pos_rows, pos_labels, self.num_labels) & valid  # targets: is (row, label) positive?
        # BCE on p = path * sigmoid(z), in log space for stability.
        log_path = torch.log(path.clamp(min=_EPS))
        log_p = log_path + F.logsigmoid(z)
        log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - _EPS))
        bce = -(y * log_p + (~y & valid) * log_not_p)
        loss = bce.sum(1).mean()
        n_pos = y.sum()
        path_loss = -(log_path * y).sum() / n_pos.clamp(min=1)
        if lam > 0:
            loss = loss + lam * path_loss
        stats = {"recall": float(n_pos) / max(1, len(pos_labels)), "path_loss": float(path_loss.detach())}
        return loss, stats

    @torch.no_grad()
    def search_tensors(self) -> SearchTensors:
        """The arrays the search reads, with A's weights normalised once."""
        return SearchTensors(
            W_C=self.W_C.detach().float(),
            b_C=self.b_C.detach().float(),
            A_ids=self.A_ids,
            A_weights=self.edge_weights().detach(),
            W_L=self.W_L.detach().float(),
            b_L=self.b_L.detach().float(),
            alpha=self.cfg.alpha,
            partition=int(self.stage) == 1,
        )
