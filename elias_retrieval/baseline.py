"""ANNS baselines over ELIAS's own label classifiers: faiss indexes of W_L with the bias folded in.

    ann = AnnBaseline.build(W_L, b_L, "hnsw")           # or AnnBaseline.from_searcher(searcher_or_tensors, "hnsw")
    ids, scores = ann.search(phi, k=100, ef_search=128)  # scores = w_l . phi + b_l, best first

The score of label l is its classifier logit w_l . phi + b_l (the sigmoid is monotone), computed as one inner
product [w_l - m, b_l] . [phi, 1] plus m . phi. Centring on the mean label vector m changes no query's ranking
(m . phi is the same for every label) but removes the direction that all trained label vectors share, which
otherwise dominates the inner products and ruins the HNSW graph and the IVF lists (on the EURLEX57K model, HNSW
at efSearch 16 reaches 63% R@100 uncentred, 85% centred; the exact flat index reaches 89%).

Kinds: "flat" (exact, IndexFlatIP), "hnsw" (IndexHNSWFlat, inner product; efSearch per query) and "ivf"
(IndexIVFFlat, inner product, spherical k-means on the label vectors; nprobe per query). When faiss sees a GPU,
flat and ivf indexes run on it (faiss has no GPU HNSW). faiss is an optional dependency (`.[bench]`).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

KINDS = ("flat", "hnsw", "ivf")
METHOD_NAMES = {"flat": "Flat (faiss)", "hnsw": "HNSW (faiss)", "ivf": "IVF (faiss)"}
DEFAULT_EF_SEARCH = 128
PAD_SCORE = float("-inf")  # the score of a -1 (padding) id


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the ANNS baselines need faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def _as_f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here: the CLI imports this module eagerly)
        x = x.detach().cpu().float().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def check_kind(kind: str) -> str:
    """`kind` if it is a known baseline kind, else a ValueError listing the kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown baseline kind {kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def default_nlist(num_labels: int) -> int:
    """IVF lists: about 4 sqrt(L), at most L."""
    return max(1, min(num_labels, round(4 * math.sqrt(num_labels))))


def default_nprobe(nlist: int) -> int:
    """IVF lists probed per query unless told: a quarter of them (at least 1)."""
    return max(1, round(nlist / 4))


class AnnBaseline:
    """A faiss index of [W_L, b_L]; `search` returns label ids (-1 padded) and logits w_l . phi + b_l."""

    def __init__(self, index: Any, kind: str, dim: int, num_labels: int, nlist: int | None, on_gpu: bool,
                 build_seconds: float, threads: int | None, build_params: dict[str, int] | None = None,
                 center: np.ndarray | None = None, keep: tuple[Any, ...] = ()):
        self.index = index
        self.kind = kind
        self.build_params = dict(build_params or {})  # M / ef_construction (hnsw), nlist (ivf)
        self.dim = dim  # the embedding dimension d (the index holds d + 1 columns)
        self.num_labels = num_labels
        self.nlist = nlist
        self.on_gpu = on_gpu
        self.build_seconds = build_seconds
        self.threads = threads
        self.center = center  # (d,) subtracted from every W_L row before indexing; m . phi is added back
        self._keep = keep  # faiss objects the index points to (quantizer, GPU resources) must outlive it

    @property
    def method(self) -> str:
        """The name results are reported under, e.g. "HNSW (faiss)"."""
        return METHOD_NAMES[self.kind]

    @classmethod
    def build(
        cls,
        W_L: np.ndarray | torch.Tensor,
        b_L: np.ndarray | torch.Tensor,
        kind: str,
        *,
        M: int = 32,
        ef_construction: int = 200,
        nlist: int | None = None,
        seed: int = 0,
        threads: int | None = None,
        center: bool | None = None,
    ) -> AnnBaseline:
        """Index the L label classifiers W_L (L, d) with biases b_L (L,) as `kind` (flat | hnsw | ivf).

        `center` (default: for hnsw and ivf, not for the exact flat) indexes W_L minus its mean row; see above.
        `threads` sets faiss's OpenMP thread count (process-wide) for the build and for every `search`.
        """
        check_kind(kind)
        W, b = _as_f32(W_L), _as_f32(b_L)
        if W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
            raise ValueError(f"W_L must be a non-empty (L, d) matrix, got shape {W.shape}")
        if b.shape != (W.shape[0],):
            raise ValueError(f"b_L must have shape ({W.shape[0]},) to match W_L {W.shape}, got {b.shape}")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ValueError("W_L and b_L must be finite")
        for name, v in (("M", M), ("ef_construction", ef_construction)):
            if v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        faiss = _faiss()
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        L, d = W.shape
        mean = None
        if kind != "flat" if center is None else center:
            mean = W.mean(0, dtype=np.float64).astype(np.float32)
            W = W - mean
        X = np.ascontiguousarray(np.concatenate([W, b[:, None]], axis=1))  # w . phi + b = [w, b] . [phi, 1]
        t0 = time.perf_counter()
        keep: tuple[Any, ...] = ()
        if kind == "flat":
            index = faiss.IndexFlatIP(d + 1)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d + 1, M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        else:
            nlist = default_nlist(L) if nlist is None else nlist
            if not 1 <= nlist <= L:
                raise ValueError(f"nlist must be between 1 and the number of labels ({L}), got {nlist}")
            quantizer = faiss.IndexFlatIP(d + 1)
            index = faiss.IndexIVFFlat(quantizer, d + 1, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.train(X)
            keep = (quantizer,)
        on_gpu = kind != "hnsw" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
        if on_gpu:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
            keep = (*keep, res)
        index.add(X)
        params = {"hnsw": {"M": M, "ef_construction": ef_construction}, "ivf": {"nlist": nlist}}.get(kind, {})
        return cls(index, kind, d, L, nlist if kind == "ivf" else None, on_gpu, time.perf_counter() - t0, threads,
                   params, mean, keep)

    @classmethod
    def from_searcher(cls, searcher: Any, kind: str, **kw: Any) -> AnnBaseline:
        """`build` from a `Searcher` or a `SearchTensors`; a fp16/int8 W_L (with W_L_scale) is dequantised.

        Rows are indexed in label-id order (an index stores them in cluster order), so ids are label ids.
        """
        from elias_retrieval.label_layout import in_label_order

        t = in_label_order(getattr(searcher, "tensors", searcher))
        W = t.W_L.detach().cpu().float()
        if t.W_L_scale is not None:
            W = W * t.W_L_scale.detach().cpu().float().unsqueeze(1)
        return cls.build(W, t.b_L, kind, **kw)

    def settings(self, ef_search: int | None = None, nprobe: int | None = None) -> dict[str, int]:
        """The index's parameters with the per-query ones `search` would use (defaults filled in, checked)."""
        if ef_search is not None and self.kind != "hnsw":
            raise ValueError(f"ef_search applies to the hnsw baseline only, not {self.kind}")
        if nprobe is not None and self.kind != "ivf":
            raise ValueError(f"nprobe applies to the ivf baseline only, not {self.kind}")
        for name, v in (("ef_search", ef_search), ("nprobe", nprobe)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be at least 1, got {v}")
        out = dict(self.build_params)
        if self.kind == "hnsw":
            out["ef_search"] = ef_search or DEFAULT_EF_SEARCH
        elif self.kind == "ivf":
            assert self.nlist is not None
            out["nprobe"] = min(nprobe or default_nprobe(self.nlist), self.nlist)
        return out

    def search(
        self,
        emb: np.ndarray | torch.Tensor,
        k: int,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k labels of query embeddings (B, d) or (d,): ids (B, k) int64 and scores (B, k) float32.

        Ids are -1 (score -inf) past the labels found. `ef_search` (hnsw, default 128, raised to k by faiss)
        and `nprobe` (ivf, default nlist / 4) apply to their kind only.
        """
        if isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be at least 1, got {k}")
        settings = self.settings(ef_search, nprobe)
        q = _as_f32(emb)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query embeddings must have shape (B, {self.dim}), got {tuple(q.shape)}")
        faiss = _faiss()
        if self.threads is not None:
            faiss.omp_set_num_threads(self.threads)
        shift = None if self.center is None else q @ self.center
        q = np.concatenate([q, np.ones((q.shape[0], 1), dtype=np.float32)], axis=1)
        params = None
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=settings["ef_search"])
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=settings["nprobe"])
        scores, ids = self.index.search(q, k, params=params)
        ids = ids.astype(np.int64, copy=False)
        if shift is not None:
            scores += shift[:, None]
        scores = np.where(ids >= 0, scores, np.float32(PAD_SCORE)).astype(np.float32, copy=False)
        return ids, scores
