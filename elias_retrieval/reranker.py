"""ELIAS++: a sparse tf-idf linear ranker that re-ranks ELIAS's top candidates (ELIAS.md, "ELIAS++").

Each label has a pruned sparse weight vector over the tf-idf features, trained on ELIAS's own top-`depth`
lists as hard negatives. The fused score is `elias^(1 - w) * rank^w`, where `rank = exp(-max(0, 1 - margin)^3)`
maps the linear margin into (0, 1] and `w` is chosen on the dev split. Re-ranking re-orders ELIAS's top `depth`
candidates; the top 100 of the re-ordered list is the answer, so with `depth` 100 (the paper's) R@100 is
unchanged, and with a deeper window a label the ranker knows well can climb into it from further down.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from numba import njit
from safetensors.torch import load_file

from elias_retrieval.atomic import write_json, write_safetensors

RANKER_TENSORS = "ranker.safetensors"
RANKER_META = "ranker.json"
_ROWS_PER_THREAD = 256  # margins splits a batch over threads only when each gets at least this many rows


@dataclass
class SparseRanker:
    W: sp.csr_matrix  # (L, F) label weight vectors, pruned
    bias: np.ndarray  # (L,)
    fusion_weight: float = 0.5
    depth: int = 100  # ELIAS's top-`depth` candidates are re-ordered (the lists it was trained on)
    _W_T: tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False)
    _local: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def margins(self, X: sp.csr_matrix, ids: np.ndarray) -> np.ndarray:
        """Linear margins w_l . x + b_l for the (B, k) label ids (-1 = padding, margin -inf)."""
        if self._W_T is None or self._W_T[0] is not self.W:  # W.T as CSR, once (not per call: a server's batches)
            T = self.W.T.tocsr()
            self._W_T = (self.W, T.indptr.astype(np.int64), T.indices.astype(np.int64), T.data.astype(np.float32))
        _, t_ptr, t_idx, t_val = self._W_T
        X = X.tocsr()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        L = self.W.shape[0]
        if ids.ndim != 2 or X.shape[0] != ids.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows for {ids.shape[0]} candidate lists")
        if ids.size and int(ids.max()) >= L:
            raise ValueError(f"candidate label id {int(ids.max())} past the ranker's {L} labels")
        x_ptr, x_idx, x_val = X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float32)
        threads = max(1, min(torch.get_num_threads(), len(ids) // _ROWS_PER_THREAD))
        if threads == 1:
            slot = getattr(self._local, "slot", None)  # this thread's, kept between calls (a server's queries)
            if slot is None or len(slot) != L:
                slot = self._local.slot = np.full(L, -1, dtype=np.int32)
            m = candidate_dots(x_ptr, x_idx, x_val, t_ptr, t_idx, t_val, ids, slot)
        else:  # row blocks on threads of their own (the kernel releases the GIL; no numba thread pool to share)
            bounds = np.linspace(0, len(ids), threads + 1).astype(np.int64)
            def block(a: int, b: int) -> np.ndarray:  # x_ptr's slice keeps its offsets into x_idx, x_val
                return candidate_dots(x_ptr[a: b + 1], x_idx, x_val, t_ptr, t_idx, t_val, ids[a:b],
                                      np.full(L, -1, dtype=np.int32))

            with ThreadPoolExecutor(threads) as pool:
                m = np.concatenate(list(pool.map(block, bounds[:-1].tolist(), bounds[1:].tolist())))
        m += self.bias[np.where(ids >= 0, ids, 0)]
        return np.where(ids >= 0, m, -np.inf).astype(np.float32)

    def pruned(self, threshold: float) -> SparseRanker:
        """A copy without the weights of magnitude below `threshold` (biases and fusion weight kept)."""
        W = self.W.tocsr(copy=True)
        W.data[np.abs(W.data) < threshold] = 0.0
        W.eliminate_zeros()
        return SparseRanker(W, self.bias.copy(), self.fusion_weight, self.depth)

    @staticmethod
    def rank_score(margins: np.ndarray) -> np.ndarray:
        return np.exp(-np.maximum(0.0, 1.0 - margins) ** 3)

    def fuse(self, scores: np.ndarray, margins: np.ndarray, weight: float | None = None) -> np.ndarray:
        w = self.fusion_weight if weight is None else weight
        r = self.rank_score(margins)
        return np.power(np.maximum(scores, 1e-12), 1.0 - w) * np.power(np.maximum(r, 1e-12), w)

    def rerank(
        self, X: sp.csr_matrix, ids: np.ndarray, scores: np.ndarray, weight: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Re-order each row of (ids, scores) by the fused score; padding stays last."""
        order, fused = self.order(X, ids, scores, weight)
        return np.take_along_axis(ids, order, 1), fused

    def order(
        self, X: sp.csr_matrix, ids: np.ndarray, scores: np.ndarray, weight: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (B, k) permutation that sorts each row by the fused score (padding last), and the sorted scores."""
        fused = np.where(ids >= 0, self.fuse(scores, self.margins(X, ids), weight), -1.0)
        order = np.argsort(-fused, axis=1, kind="stable")
        return order, np.take_along_axis(fused, order, 1).astype(np.float32)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        W = self.W.tocsr()
        write_safetensors(d / RANKER_TENSORS, {
            "indptr": torch.from_numpy(W.indptr.astype(np.int64)),
            "indices": torch.from_numpy(W.indices.astype(np.int32)),
            "data": torch.from_numpy(W.data.astype(np.float32)),
            "bias": torch.from_numpy(self.bias.astype(np.float32)),
        })
        write_json(d / RANKER_META, {"shape": list(W.shape), "fusion_weight": self.fusion_weight, "nnz": int(W.nnz),
                                     "depth": self.depth})

    @classmethod
    def load(cls, directory: str | Path) -> SparseRanker:
        d = Path(directory)
        meta = json.loads((d / RANKER_META).read_text())
        t = load_file(str(d / RANKER_TENSORS))
        W = sp.csr_matrix((t["data"].numpy(), t["indices"].numpy(), t["indptr"].numpy()), shape=tuple(meta["shape"]))
        return cls(W, t["bias"].numpy(), float(meta["fusion_weight"]), int(meta.get("depth", 100)))


@njit(cache=True, nogil=True)
def candidate_dots(x_ptr, x_idx, x_val, t_ptr, t_idx, t_val, ids, slot):  # pragma: no cover (compiled)
    """(B, k) float32: x_i . w_l for each query row i of CSR X and each label l = ids[i, j] >= 0 (0 for padding),
    from W.T as CSR (t_*: per feature, the labels weighing it). Each query reads the W.T rows of its own few
    features and keeps the products of its candidates, through `slot` (one int32 per label, all -1: a label ->
    list position map, left all -1). Releases the GIL (margins runs large batches on several threads)."""
    B, k = ids.shape
    num_features = len(t_ptr) - 1
    out = np.zeros((B, k), dtype=np.float32)
    acc = np.zeros(k, dtype=np.float64)
    for i in range(B):
        for j in range(k):
            if ids[i, j] >= 0:
                slot[ids[i, j]] = j  # a label twice in a list shares one slot
            acc[j] = 0.0
        for p in range(x_ptr[i], x_ptr[i + 1]):
            f = x_idx[p]
            if f >= num_features:
                continue
            xv = x_val[p]
            for q in range(t_ptr[f], t_ptr[f + 1]):
                s = slot[t_idx[q]]
                if s >= 0:
                    acc[s] += xv * t_val[q]
        for j in range(k):
            if ids[i, j] >= 0:
                out[i, j] = acc[slot[ids[i, j]]]
        for j in range(k):
            if ids[i, j] >= 0:
                slot[ids[i, j]] = -1
    return out


def has_ranker(directory: str | Path) -> bool:
    return (Path(directory) / RANKER_META).is_file()
