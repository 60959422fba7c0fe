"""The searcher: a loaded index answering text, sparse-feature or embedding queries (the library object).

    searcher = Searcher.open("runs/eurlex57k-index")
    res = searcher.search_texts(["common organisation of the market in wine"], k=10)
    res.ids[0], res.scores[0], res.label_names[0]

Queries are checked here (`QueryError(field, message)` names the offending field; the gRPC servicer maps
it to INVALID_ARGUMENT), encoded, and searched in one batch with `search.search`. When the index carries
an ELIAS++ re-ranker, text and sparse queries are re-ranked (the top max(k, the ranker's depth) re-ordered by the
fused score, then cut to k); embedding queries have no tf-idf row and get plain ELIAS. Results are plain numpy
arrays plus the dataset's label ids and names. The gRPC server (server.py) and the CLI only convert.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from elias_retrieval.search import SearchTensors, pack_cluster_weights, search
from elias_retrieval.sparse_projection import sparse_batch

if TYPE_CHECKING:
    from elias_retrieval.features import TfidfFeaturizer
    from elias_retrieval.reranker import SparseRanker

DEFAULT_MAX_K = 1000
DEFAULT_MAX_SHORTLIST = 100_000
DEFAULT_MAX_BATCH_QUERIES = 1024
_HUGE_PAGE = 2 << 20


class QueryError(ValueError):
    """A request is invalid; `field` names the offending field (e.g. `query.embedding`, `params.k`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class Query:
    """One query: exactly one of raw text, sparse features (ids, values) or a dense embedding."""

    text: str | None = None
    sparse: tuple[np.ndarray, np.ndarray] | None = None
    embedding: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "sparse" if self.sparse is not None else "embedding"


@dataclass
class SearchParams:
    """Resolved search parameters (the index defaults filled in and checked)."""

    k: int
    beam_size: int
    shortlist_size: int
    explain: bool = False
    rerank: bool = True  # ELIAS++ re-ranking of text and sparse queries, when the index has a re-ranker


class LabelStrings:
    """The dataset's id and name of each dense label id, looked up when a result's strings are first read.

    `ids` and `names` are indexed by dense label id: a list (a whole vocabulary) or a dict (the labels of
    some results). None: the dense id itself as the id, "" as the name.
    """

    def __init__(self, ids: Sequence[str] | Mapping[int, str] | None = None,
                 names: Sequence[str] | Mapping[int, str] | None = None):
        self.ids, self.names = ids, names

    def ids_of(self, dense: np.ndarray) -> list[list[str]]:
        """Per row of (B, k) dense ids, the dataset ids of its valid (>= 0) entries."""
        return _look_up(self.ids, dense, str)

    def names_of(self, dense: np.ndarray) -> list[list[str]]:
        """Per row of (B, k) dense ids, the names of its valid (>= 0) entries."""
        return _look_up(self.names, dense, lambda _: "")


def _look_up(table: Sequence[str] | Mapping[int, str] | None, dense: np.ndarray,
             without: Callable[[int], str]) -> list[list[str]]:
    get = without if table is None else table.__getitem__
    return [[get(j) for j in row if j >= 0] for row in dense.tolist()]


@dataclass
class SearchResults:
    """Top-k per query, best first. `ids` are dense label ids, -1 (score 0) where fewer were reachable.

    `label_ids` / `label_names` give the dataset's ids and names of the valid hits of each row; they are
    looked up in `labels` when first read (a caller that needs only `ids` and `scores` never pays for them).
    With `explain`, `cluster`, `path` and `label_prob` give each hit's best cluster and its two score factors.
    `methods` says per row what ranked it: "ELIAS++" (scores are then the fused scores) or "ELIAS".
    """

    ids: np.ndarray  # (B, k) int64
    scores: np.ndarray  # (B, k) float32
    labels: LabelStrings = field(default_factory=LabelStrings, repr=False)
    cluster: np.ndarray | None = None  # (B, k) int64
    path: np.ndarray | None = None  # (B, k) float32
    label_prob: np.ndarray | None = None  # (B, k) float32
    methods: list[str] | None = None  # per row: "ELIAS++" or "ELIAS"

    @cached_property
    def label_ids(self) -> list[list[str]]:
        return self.labels.ids_of(self.ids)

    @cached_property
    def label_names(self) -> list[list[str]]:
        return self.labels.names_of(self.ids)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, start: int, stop: int, k: int | None = None) -> SearchResults:
        """Rows [start, stop), cut to the first k hits."""
        sl = (slice(start, stop), slice(0, k))

        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sl]

        return SearchResults(self.ids[sl], self.scores[sl], self.labels, cut(self.cluster), cut(self.path),
                             cut(self.label_prob), None if self.methods is None else self.methods[start:stop])


@dataclass
class SearcherInfo:
    """What a client may ask about the loaded index (GetIndexInfo)."""

    index_version: str
    num_labels: int
    num_clusters: int
    kappa: int
    dim: int
    encoder: str
    num_features: int
    query_kinds: list[str]
    defaults: dict[str, int]
    max_k: int
    max_shortlist_size: int
    max_batch_queries: int
    label_weights_dtype: str
    device: str
    reranker: bool = False  # an ELIAS++ re-ranker answers text (and sparse) queries unless a request opts out
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resident_copy(t: Tensor, huge_pages: bool = True) -> Tensor:
    """A private in-memory copy of `t` (e.g. of a memory-mapped index tensor), keeping its strides.

    On Linux the copy lives in anonymous memory advised for transparent huge pages: the random row
    gathers of search (A rows, W_L rows) then miss the TLB far less often than with 4 KiB pages.
    """
    if not (huge_pages and sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")) or t.numel() == 0:
        return t.clone()
    src = t if t.is_contiguous() else t.T.contiguous().T if t.dim() == 2 and t.T.is_contiguous() else t.contiguous()
    nbytes = src.numel() * src.element_size()
    buf = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % _HUGE_PAGE
    flat = torch.frombuffer(buf, dtype=src.dtype, count=src.numel(), offset=offset)  # keeps `buf` alive
    out = flat.as_strided(src.shape, src.stride())
    out.copy_(src)
    return out


def _label_strings(labels: Any, num_labels: int) -> LabelStrings:
    """The dataset ids and names (as strings, "" for none) of a LabelVocab-like object; None: dense ids."""
    if labels is None:
        return LabelStrings()
    ids = [str(x) for x in labels.ids]
    names = [("" if n is None else str(n)) for n in getattr(labels, "names", [None] * len(ids))]
    if len(ids) != num_labels or len(names) != num_labels:
        raise ValueError(f"the label vocabulary has {len(ids)} labels, the index {num_labels}")
    return LabelStrings(ids, names)


class Searcher:
    """A loaded index: `search_embeddings`, `search_texts`, `search_sparse` or `search` (mixed queries).

    Thread-safe: the tensors are read-only and the encoder is called under a lock. With a `ranker` (ELIAS++)
    and its tf-idf `featurizer` (default: the encoder's), text queries are re-ranked, and sparse queries too
    when the featurizer is the encoder's (their features are then the ranker's).
    """

    def __init__(
        self,
        tensors: SearchTensors,
        encoder: torch.nn.Module | None,
        labels: Any,
        info: dict[str, Any] | None = None,
        device: str | torch.device = "auto",
        max_k: int = DEFAULT_MAX_K,
        max_shortlist_size: int = DEFAULT_MAX_SHORTLIST,
        max_batch_queries: int = DEFAULT_MAX_BATCH_QUERIES,
        resident: bool = True,
        ranker: SparseRanker | None = None,
        featurizer: TfidfFeaturizer | None = None,
    ):
        info = dict(info or {})
        self.device = resolve_device(device)
        self.tensors = self._prepare(tensors, self.device, resident)
        self.encoder = encoder.to(self.device).eval() if encoder is not None else None
        self._encoder_lock = threading.Lock()
        t = self.tensors
        self.labels = _label_strings(labels, t.num_labels)
        defaults = dict(info.get("defaults") or {})
        self.defaults = {
            "k": int(defaults.get("k", 100)),
            "beam_size": min(int(defaults.get("beam_size", 20)), t.num_clusters),
            "shortlist_size": int(defaults.get("shortlist_size", 2000)),
        }
        enc_featurizer = getattr(encoder, "featurizer", None)
        self.num_features = int(enc_featurizer.num_features) if enc_featurizer is not None else 0
        self.ranker = ranker
        self.featurizer = featurizer if featurizer is not None or ranker is None else enc_featurizer
        if ranker is not None and (self.featurizer is None or ranker.W.shape != (t.num_labels,
                                                                                 self.featurizer.num_features)):
            raise ValueError(f"the re-ranker's weights have shape {ranker.W.shape}, expected (labels, tf-idf "
                             "features of its featurizer)")
        self.rerank_kinds = [] if ranker is None else (
            (["text"] if getattr(self.featurizer, "kind", None) == "text" else [])
            + (["sparse"] if self.featurizer is enc_featurizer and self.num_features else []))
        # A tf-idf encoder over given sparse features (XC BoW, .npz datasets) has no vocabulary: it takes no text.
        self.takes_text = encoder is not None and getattr(enc_featurizer, "kind", "text") == "text"
        kinds = ["embedding"] + (["text"] if self.takes_text else []) + (["sparse"] if self.num_features else [])
        self.max_k = min(max_k, t.num_labels)
        self.max_shortlist_size = max(min(max_shortlist_size, t.num_labels), self.defaults["shortlist_size"])
        self.defaults["k"] = min(self.defaults["k"], self.max_k)
        self.info = SearcherInfo(
            index_version=str(info.get("index_version", "")),
            num_labels=t.num_labels,
            num_clusters=t.num_clusters,
            kappa=int(t.A_ids.shape[1]),
            dim=t.dim,
            encoder=str(getattr(encoder, "kind", "")) if encoder is not None else "",
            num_features=self.num_features,
            query_kinds=kinds,
            defaults=dict(self.defaults),
            max_k=self.max_k,
            max_shortlist_size=self.max_shortlist_size,
            max_batch_queries=max_batch_queries,
            label_weights_dtype=str(tensors.W_L.dtype).removeprefix("torch."),
            device=self.device.type,
            reranker=ranker is not None,
            extra={k: v for k, v in info.items() if k not in ("defaults", "index_version")},
        )

    @staticmethod
    def _prepare(t: SearchTensors, device: torch.device, resident: bool) -> SearchTensors:
        """Lay the tensors out for fast search on `device`.

        CPU: a stored fp16 W_C is packed for fbgemm (fp16 weights, fp32 arithmetic); an fp32 one (or no
        fbgemm) is kept as a view of a contiguous fp32 (d, C) matrix (MKL's GEMV on that layout is about 4x
        faster at batch 1). Everything sits in resident huge-page memory. CUDA: W_C in W_L's half precision.
        """
        if device.type == "cpu":
            keep = (lambda x: resident_copy(x)) if resident else (lambda x: x)
            packed = pack_cluster_weights(t.W_C, t.b_C)
            W_C = keep(t.W_C.contiguous()) if packed is not None else keep(t.W_C.T.float().contiguous()).T
            return SearchTensors(
                W_C=W_C, b_C=keep(t.b_C.float()), A_ids=keep(t.A_ids), A_weights=keep(t.A_weights.float()),
                W_L=keep(t.W_L), b_L=keep(t.b_L.float()), alpha=float(t.alpha),
                W_L_scale=None if t.W_L_scale is None else keep(t.W_L_scale.float()), W_C_packed=packed,
                row_labels=None if t.row_labels is None else keep(t.row_labels),
            )
        moved = t.to(device)
        if moved.W_L.dtype in (torch.float16, torch.bfloat16):
            moved.W_C = moved.W_C.to(moved.W_L.dtype)
        return moved

    @classmethod
    def open(cls, index_dir: str | Path, device: str | torch.device = "auto", **kwargs: Any) -> Searcher:
        """Load an index directory (index_format.read_index) with its encoder and labels."""
        from elias_retrieval.index_format import ENCODER_FEATURIZER, read_index

        index = read_index(index_dir, device="cpu")
        manifest = dict(index.manifest)
        version = manifest.get("index_version") or manifest.get("version") or manifest.get("created") or ""
        info = {"index_version": str(version), "defaults": dict(index.defaults), "path": str(index_dir)}
        encoder, ranker, featurizer = index.load_encoder(), index.load_ranker(), None
        if ranker is not None:  # the tf-idf encoder's featurizer is shared, not loaded twice
            shared = manifest["reranker"]["featurizer"] == ENCODER_FEATURIZER
            featurizer = getattr(encoder, "featurizer", None) if shared else index.load_featurizer()
        return cls(index.tensors, encoder, index.labels, info, device, ranker=ranker, featurizer=featurizer, **kwargs)

    # ----- checking requests -----

    def resolve_params(
        self, k: int | None = None, beam_size: int | None = None, shortlist_size: int | None = None,
        explain: bool = False, prefix: str = "params.", rerank: bool = True,
    ) -> SearchParams:
        """Fill in the index defaults and check the ranges; raise QueryError naming the field."""
        p = SearchParams(
            k=self.defaults["k"] if k is None else k,
            beam_size=self.defaults["beam_size"] if beam_size is None else beam_size,
            shortlist_size=self.defaults["shortlist_size"] if shortlist_size is None else shortlist_size,
            explain=bool(explain), rerank=bool(rerank),
        )
        limits = {"k": self.max_k, "beam_size": self.info.num_clusters, "shortlist_size": self.max_shortlist_size}
        what = {"beam_size": " (the number of clusters)", "shortlist_size": "", "k": ""}
        for name, hi in limits.items():
            v = getattr(p, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise QueryError(prefix + name, f"must be an integer, got {v!r}")
            if not 1 <= v <= hi:
                raise QueryError(prefix + name, f"must be between 1 and {hi}{what[name]}, got {v}")
        return p

    def check_query(self, q: Query, prefix: str = "query") -> Query:
        """Validate one query and normalise its arrays (float32 / int64); raise QueryError naming the field."""
        given = [n for n in ("text", "sparse", "embedding") if getattr(q, n) is not None]
        if len(given) != 1:
            raise QueryError(prefix, "exactly one of text, sparse or embedding must be set" if given
                             else "no query given (set one of text, sparse or embedding)")
        if q.text is not None:
            if not self.takes_text:
                kinds = {"sparse": "sparse features", "embedding": "an embedding"}
                send = " or ".join(v for k, v in kinds.items() if k in self.info.query_kinds)
                why = (f"its {self.info.encoder} encoder reads feature ids, it has no text vocabulary"
                       if self.encoder is not None else "it has no encoder")
                raise QueryError(f"{prefix}.text", f"this index takes no text ({why}); send {send}")
            if not isinstance(q.text, str) or not q.text.strip():
                raise QueryError(f"{prefix}.text", "is empty")
            return q
        if q.sparse is not None:
            if not self.num_features:
                raise QueryError(f"{prefix}.sparse", f"this index's encoder ({self.info.encoder or 'none'}) "
                                                     "does not take sparse features")
            idx = np.asarray(q.sparse[0]).reshape(-1)
            val = np.asarray(q.sparse[1], dtype=np.float32).reshape(-1)
            if idx.size == 0:
                raise QueryError(f"{prefix}.sparse.indices", "is empty")
            if idx.shape != val.shape:
                raise QueryError(f"{prefix}.sparse.values",
                                 f"has {val.size} values for {idx.size} indices (must be equal)")
            if not np.issubdtype(idx.dtype, np.integer):
                raise QueryError(f"{prefix}.sparse.indices", "must be integers")
            bad = (idx < 0) | (idx >= self.num_features)
            if bad.any():
                raise QueryError(f"{prefix}.sparse.indices",
                                 f"{int(idx[bad][0])} is out of range (0 .. {self.num_features - 1})")
            if not np.isfinite(val).all():
                raise QueryError(f"{prefix}.sparse.values", "must be finite (no NaN or inf)")
            return Query(sparse=(idx.astype(np.int64), val))
        emb = np.asarray(q.embedding, dtype=np.float32).reshape(-1)
        if emb.size != self.info.dim:
            raise QueryError(f"{prefix}.embedding", f"has dimension {emb.size}, the index expects {self.info.dim}")
        if not np.isfinite(emb).all():
            raise QueryError(f"{prefix}.embedding", "must be finite (no NaN or inf)")
        return Query(embedding=emb)

    # ----- encoding and search -----

    def encode(self, queries: Sequence[Query]) -> Tensor:
        """Embeddings (B, d) of checked queries, in order; each kind is encoded as one batch."""
        out = torch.empty(len(queries), self.info.dim, dtype=torch.float32)
        groups: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(q.kind, []).append(i)
        for kind, rows in groups.items():
            if kind == "embedding":
                out[rows] = torch.from_numpy(np.stack([queries[i].embedding for i in rows]))  # type: ignore[misc]
                continue
            with self._encoder_lock, torch.inference_mode():
                if kind == "text":
                    emb = self.encoder.encode([queries[i].text for i in rows])  # type: ignore[union-attr]
                else:
                    emb = self.encoder(self._sparse_batch([queries[i].sparse for i in rows]))  # type: ignore[misc]
            out[rows] = emb.float().cpu()
        return out

    def _sparse_batch(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Tensor]:
        """The tf-idf encoder's batch (distinct feature ids, CSR re-indexed onto them) for sparse queries."""
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(r[0]) for r in rows])
        cols = np.concatenate([r[0] for r in rows])
        values = np.concatenate([r[1] for r in rows])
        return sparse_batch(indptr, cols, values, self.num_features, self.device)

    def search(self, queries: Sequence[Query], params: SearchParams) -> SearchResults:
        """Check, encode and search queries of any kinds (one batch)."""
        if not queries:
            raise QueryError("queries", "is empty")
        if len(queries) > self.info.max_batch_queries:
            raise QueryError("queries", f"has {len(queries)} queries, at most {self.info.max_batch_queries}")
        checked = [self.check_query(q, f"queries[{i}]" if len(queries) > 1 else "query") for i, q in enumerate(queries)]
        return self.search_checked(checked, params)

    def search_checked(self, queries: Sequence[Query], params: SearchParams) -> SearchResults:
        """Encode and search queries that already passed `check_query` (the batcher's entry point)."""
        return self._search_tensor(self.encode(queries), params, queries)

    def candidates(self, params: SearchParams) -> int:
        """How many ELIAS candidates a re-ranked query's answer is chosen from: the ranker's depth, or k."""
        return max(params.k, self.ranker.depth if self.ranker is not None else 0)

    def reranks(self, params: SearchParams) -> bool:
        """Whether `params` re-rank (text and sparse queries) on this index."""
        return self.ranker is not None and params.rerank

    def _ranker_features(self, queries: Sequence[Query]) -> sp.csr_matrix:
        """tf-idf rows of text and sparse queries, in the re-ranker's feature space."""
        assert self.featurizer is not None
        F = self.featurizer.num_features
        texts = [q.text for q in queries if q.kind == "text"]
        T = self.featurizer.transform(texts) if texts else None  # type: ignore[arg-type]
        parts, t = [], 0
        for q in queries:
            if q.kind == "text":
                parts.append(T[t])  # type: ignore[index]
                t += 1
            else:
                idx, val = q.sparse  # type: ignore[misc]
                parts.append(sp.csr_matrix((val, idx, [0, len(idx)]), shape=(1, F)))
        X = sp.vstack(parts, format="csr", dtype=np.float32)
        X.sum_duplicates()  # repeated sparse ids are summed
        return X

    def search_embeddings(
        self, emb: np.ndarray | Tensor, k: int | None = None, beam_size: int | None = None,
        shortlist_size: int | None = None, explain: bool = False,
    ) -> SearchResults:
        """Search a batch of query embeddings (B, d): plain ELIAS (an embedding has no tf-idf to re-rank by)."""
        p = self.resolve_params(k, beam_size, shortlist_size, explain, prefix="")
        emb = torch.as_tensor(np.asarray(emb, dtype=np.float32) if not isinstance(emb, Tensor) else emb)
        if emb.dim() == 1:
            emb = emb.unsqueeze(0)
        if emb.dim() != 2 or emb.shape[1] != self.info.dim:
            raise QueryError("embedding", f"must have shape (B, {self.info.dim}), got {tuple(emb.shape)}")
        if not bool(torch.isfinite(emb).all()):
            raise QueryError("embedding", "must be finite (no NaN or inf)")
        return self._search_tensor(emb.float(), p)

    def search_texts(
        self, texts: Sequence[str], k: int | None = None, beam_size: int | None = None,
        shortlist_size: int | None = None, explain: bool = False, rerank: bool = True,
    ) -> SearchResults:
        """Encode raw texts with the index's encoder and search them (ELIAS++ when the index has a ranker)."""
        p = self.resolve_params(k, beam_size, shortlist_size, explain, prefix="", rerank=rerank)
        return self.search([Query(text=t) for t in texts], p)

    def search_sparse(
        self, rows: Sequence[tuple[Any, Any]], k: int | None = None, beam_size: int | None = None,
        shortlist_size: int | None = None, explain: bool = False, rerank: bool = True,
    ) -> SearchResults:
        """Search sparse (feature ids, values) rows in the encoder's featurizer space (see the proto)."""
        p = self.resolve_params(k, beam_size, shortlist_size, explain, prefix="", rerank=rerank)
        return self.search([Query(sparse=(np.asarray(i), np.asarray(v))) for i, v in rows], p)

    def _search_tensor(self, emb: Tensor, p: SearchParams, queries: Sequence[Query] | None = None) -> SearchResults:
        rows = [i for i, q in enumerate(queries or []) if q.kind in self.rerank_kinds] if self.reranks(p) else []
        k = self.candidates(p) if rows else p.k
        r = search(emb.to(self.device), self.tensors, k=k, beam_size=p.beam_size, shortlist_size=p.shortlist_size)
        ids, scores = r.ids.cpu().numpy(), r.scores.float().cpu().numpy()
        explained = [r.cluster.cpu().numpy(), r.path.float().cpu().numpy(), r.label_prob.float().cpu().numpy()] \
            if p.explain else []
        methods = ["ELIAS"] * len(ids)
        if rows:  # ELIAS++: re-order the candidates by the fused score (as `elias eval` does), then cut to k
            assert self.ranker is not None and queries is not None
            X = self._ranker_features([queries[i] for i in rows])
            order, fused = self.ranker.order(X, ids[rows], scores[rows])
            for a in [ids, *explained]:
                a[rows] = np.take_along_axis(a[rows], order, 1)
            scores[rows] = np.where(ids[rows] >= 0, fused, 0.0)
            for i in rows:
                methods[i] = "ELIAS++"
        ids, scores = ids[:, : p.k], scores[:, : p.k]
        res = SearchResults(ids, scores, self.labels, methods=methods)
        if p.explain:
            res.cluster, res.path, res.label_prob = (a[:, : p.k] for a in explained)
        return res

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> None:
        """Run a few searches, and one query of each kind the index takes, so the first request is not slow."""
        g = torch.Generator().manual_seed(0)
        p = self.resolve_params()
        for b in batch_sizes:
            self._search_tensor(torch.randn(b, self.info.dim, generator=g), p)
        if self.takes_text:
            self.search_checked([Query(text="warm up")], p)
        if self.num_features:
            self.search_checked([Query(sparse=(np.zeros(1, np.int64), np.ones(1, np.float32)))], p)

    @property
    def index_version(self) -> str:
        return self.info.index_version
