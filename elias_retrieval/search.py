"""ELIAS search in five steps (ELIAS.md, "Search"), as pure tensor code.

    1. encode            phi(x)                                  (the caller; see encoders.py)
    2. score clusters    s_c = min(1, alpha * softmax(W_C phi + b_C)); keep the top `beam`
    3. expand            each beam cluster to its kappa slots of A: path = s_c * a_cl
    4. shortlist         keep each label's best path; the top `shortlist_size` labels by path
    5. rank              final = path * sigmoid(w_l . phi + b_l) on the shortlist; the top k

The same functions serve training (with teacher forcing and gradients), offline evaluation and serving.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from elias_retrieval.cluster_blocks import cluster_block_logits

# Past this many candidates per query, dense label scoring beats gathering W_L rows (see label_logits).
_DENSE_LABELS_FACTOR = 4
# A training batch whose shortlists hold at least this fraction of the labels is scored against all of W_L.
_DISTINCT_DENSE_FRACTION = 0.9
# best_paths dedupes through a dense (B, L) buffer when L is at most this many times the candidates per query
# or at most _DENSE_DEDUPE_LABELS, with at most _DENSE_DEDUPE_ELEMENTS buffer elements at a time.
_DENSE_DEDUPE_FACTOR = 2
_DENSE_DEDUPE_LABELS = 1 << 15
_DENSE_DEDUPE_ELEMENTS = 1 << 23
# fbgemm's fp16 W_C product costs about 10 us per call more than MKL's fp32 one; it pays only once an fp32 W_C
# no longer sits in cache (measured: slower up to C x d = 512 x 256, even at 1024 x 256, faster from 4096 x 256).
_PACK_MIN_ELEMENTS = 1 << 19
# A CPU batch of at least this many queries per torch thread is searched in parts side by side (see search):
# 1.45x the queries/s at batch 256 on 2 cores (bench/search_latency.py).
_PARALLEL_MIN_ROWS = 8
# A CPU batch on a partition scores its labels by cluster blocks when its beams hold at least this many
# (query, cluster) pairs per cluster of A (blocks_pay).
_BLOCK_ROWS = 4
# The CPU scratch route prefilters a row's top m candidates only when the row has more than this many times m.
_PREFILTER_FACTOR = 8


@dataclass
class SearchTensors:
    """Everything the search reads. `A_weights` are already normalised (pad slots 0, pad id = L).

    Rows of W_L, b_L and W_L_scale, and the ids in A_ids, are storage rows; `row_labels[r]` is the label id
    that row r holds (None: row r is label r). An index stores labels in cluster order (label_layout.py).
    """

    W_C: Tensor  # (C, d) float32 | float16
    b_C: Tensor  # (C,)
    A_ids: Tensor  # (C, kappa) int64, pad = L
    A_weights: Tensor  # (C, kappa) float32 in [0, 1]
    W_L: Tensor  # (L, d) float32 | float16 | int8
    b_L: Tensor  # (L,) float32
    alpha: float
    W_L_scale: Tensor | None = None  # (L,) float32, only for int8 W_L
    W_C_packed: Any = None  # fp16 W_C and b_C packed for fbgemm (CPU; see pack_cluster_weights)
    row_labels: Tensor | None = None  # (L,) int32 | int64 label id of each row; None: the identity
    partition: bool = False  # every label sits in one row of A at most (stage 1): step 4 needs no dedupe

    def labels_of(self, rows: Tensor) -> Tensor:
        """Label ids (int64) of storage `rows`; negative rows (e.g. -1 for "no label") are kept as they are."""
        if self.row_labels is None:
            return rows
        got = self.row_labels.index_select(0, rows.clamp(min=0).reshape(-1)).view(rows.shape).long()
        return torch.where(rows < 0, rows, got)

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
            self.alpha, mv(self.W_L_scale), self.W_C_packed if torch.device(device).type == "cpu" else None,
            mv(self.row_labels), self.partition,
        )  # type: ignore[arg-type]


def pack_cluster_weights(W_C: Tensor, b_C: Tensor, min_elements: int = _PACK_MIN_ELEMENTS) -> Any:
    """fp16 W_C (and b_C) packed for fbgemm's fp16 GEMM; None for a small or fp32 W_C, or without fbgemm.

    fbgemm keeps the weights in fp16 and multiplies in fp32 (exact for stored fp16 weights, up to summation
    order): it reads half the bytes of an fp32 product, which is what bounds the CPU at small batches.
    """
    if W_C.dtype != torch.float16 or W_C.device.type != "cpu" or W_C.numel() < min_elements:
        return None
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        # Copies: the packed object keeps its bias tensor, and a view of a memory-mapped index would keep the
        # whole mapping (with every page search touched) resident.
        return torch.ops.quantized.linear_prepack_fp16(W_C.float(), b_C.to(torch.float32, copy=True))
    except (RuntimeError, AttributeError):
        return None


def cluster_logits(emb: Tensor, t: SearchTensors) -> Tensor:
    """W_C phi + b_C in fp32 for a (B, d) fp32 batch: fbgemm's packed fp16 W_C where prepared, W_C's own
    precision on CUDA, and an fp32 product otherwise (a half W_C without packing is widened per call)."""
    if t.W_C_packed is not None and not emb.is_cuda:
        return torch.ops.quantized.linear_dynamic_fp16(emb, t.W_C_packed)
    W_C = t.W_C.float() if t.W_C.dtype != torch.float32 and not emb.is_cuda else t.W_C
    return torch.addmm(t.b_C.to(W_C.dtype), emb.to(W_C.dtype), W_C.T).float()


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

    A label reached through several clusters keeps its best path. Returns (positions, valid), in no particular
    order; `valid` is False where fewer than k distinct labels were reachable. `pad_id` is L (A's pad slots).
    Three exact routes: with few labels per candidate, a dense (B, L) max over the candidates; with many (large
    L), the best candidates of each row through a reused (L,) scratch buffer on the CPU, and a sort by
    (label, path) elsewhere (CUDA sorts fast; CPU sorts of more than a few thousand keys do not).
    """
    B, N = cand_ids.shape
    k = min(k, N)
    cand_ids = cand_ids.long()  # an index read from disk stores A_ids as int32; scatter and shifts need int64
    dense = pad_id + 1 <= max(_DENSE_DEDUPE_FACTOR * N, _DENSE_DEDUPE_LABELS)
    m = k + max(k // 4, 64)  # the candidates a large-L route looks at first (widened when too few are distinct)
    if not dense and cand_path.device.type == "cpu":
        return _best_paths_scratch(cand_ids, cand_path, k, m, pad_id)  # keeps the pad slots out by itself
    score = cand_path.masked_fill(cand_ids == pad_id, -1.0)  # pad slots rank last and are never kept
    if dense:
        return _best_paths_dense(cand_ids, score, min(k, pad_id), pad_id)
    return _best_paths_sorted(cand_ids, score, k, m)


def _best_paths_dense(cand_ids: Tensor, score: Tensor, k: int, L: int) -> tuple[Tensor, Tensor]:
    """best_paths through a (rows, L + 1) buffer of each label's best path, a few thousand rows at a time."""
    B, N = cand_ids.shape
    rows = max(1, _DENSE_DEDUPE_ELEMENTS // (L + 1))
    if rows < B:
        parts = [_best_paths_dense(cand_ids[a : a + rows], score[a : a + rows], k, L) for a in range(0, B, rows)]
        return torch.cat([p for p, _ in parts]), torch.cat([v for _, v in parts])
    best = score.new_full((B, L + 1), -1.0).scatter_reduce_(1, cand_ids, score, "amax")
    top, label = torch.topk(best[:, :L], k, dim=1, sorted=False)
    # The first candidate position that holds each label's best path (ties between clusters: the first).
    arange = torch.arange(N, dtype=torch.int32, device=score.device)
    at_best = torch.where(score == best.gather(1, cand_ids), arange, N)
    first = torch.full((B, L + 1), N, dtype=torch.int32, device=score.device)
    first.scatter_reduce_(1, cand_ids, at_best, "amin")
    valid = top >= 0
    return torch.where(valid, first.gather(1, label), 0).long(), valid


# Scratch buffer values: below every candidate's key (a free slot), and above every key (the pad slot, so that
# no pad is ever kept).
_FREE = torch.iinfo(torch.long).min
_PAD = torch.iinfo(torch.long).max


class _ScratchPool:
    """(L + 1,) int64 buffers for _best_paths_scratch, reused across calls and threads; a call resets what it
    wrote. Last in, first out: a server's successive requests (on whichever worker thread) reuse the buffer
    still in cache, and concurrent searches each get their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Tensor] = []

    def acquire(self, size: int) -> Tensor:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if buf.shape[0] >= size:
                    return buf
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            return torch.full((size,), _FREE, dtype=torch.long)

    def release(self, buf: Tensor) -> None:
        with self._lock:
            self._free.append(buf)


_scratch = _ScratchPool()


def _best_paths_scratch(cand_ids: Tensor, score: Tensor, k: int, m: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """best_paths on the CPU for large L, one row at a time: the top `m` candidates of the row, each label's
    best candidate through a scratch buffer (O(m), no sort), widened until exact. Pad slots (`pad_id`) are
    never kept, whatever their score."""
    buf = _scratch.acquire(pad_id + 1)
    try:
        return _scratch_rows(cand_ids, score, k, m, buf, pad_id)
    finally:
        buf[pad_id] = _FREE
        _scratch.release(buf)


def _scratch_rows(cand_ids: Tensor, score: Tensor, k: int, m: int, buf: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    # One key per candidate, its path's float bits (non-negative floats order like their bits) above its
    # position reversed: a max over a label's keys is its best path, ties to the first position. The fewest
    # torch calls per row: at batch 1 their fixed cost is most of the time.
    B, N = cand_ids.shape
    rev = _reversed_positions(N)
    free = _free_keys(N)
    pos, valid = [], []

    def prefilter(width: int) -> int:
        # A top-m prefilter pays only when it drops most candidates: labels sit in several beam rows of A, so a
        # few times m candidates hold only about m distinct labels and the prefilter would have to widen.
        return N if _PREFILTER_FACTOR * width >= N else width

    for r in range(B):
        width = min(max(prefilter(m), k), N)
        while True:
            if width < N:
                top, top_pos = torch.topk(score[r], width, sorted=False)
                ids, rev_pos = cand_ids[r].index_select(0, top_pos), rev.index_select(0, top_pos)
            else:
                top, top_pos, ids, rev_pos = score[r], None, cand_ids[r], rev
            key = torch.add(rev_pos, top.view(torch.int32), alpha=1 << 31)
            buf[pad_id] = _PAD
            buf.scatter_reduce_(0, ids, key, "amax")
            best = torch.where(buf.index_select(0, ids) == key, top, -1.0)  # -1: not its label's best
            buf.scatter_(0, ids, free[: ids.shape[0]])  # the reset; 2x faster than index_fill_
            if width == N:
                break
            distinct = int((best >= 0).sum())
            if distinct >= k:
                break
            width = prefilter(min(N, max(2 * width, -(-width * k * 5 // (4 * max(distinct, 1))))))
        vals, j = torch.topk(best, k, sorted=False)
        pos.append(j if top_pos is None else top_pos.index_select(0, j))
        valid.append(vals >= 0)
    return torch.stack(pos), torch.stack(valid)


_constants: dict[str, Tensor] = {"rev": torch.zeros(0, dtype=torch.long), "free": torch.zeros(0, dtype=torch.long)}


def _constant(name: str, n: int, make: Callable[[int], Tensor]) -> Tensor:
    """The first n entries of a cached int64 constant vector, grown (doubling) when too short."""
    t = _constants[name]
    if t.shape[0] < n:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            t = make(max(n, 2 * t.shape[0]))
        _constants[name] = t  # a plain replace: concurrent readers keep the tensor they hold
    return t[:n]


def _reversed_positions(n: int) -> Tensor:
    """0x7FFFFFFF - arange(n) (int64), kept for the next call: a search of the same shape reuses it."""
    return _constant("rev", n, lambda m: 0x7FFFFFFF - torch.arange(m, dtype=torch.long))


def _free_keys(n: int) -> Tensor:
    """A contiguous int64 vector of n _FREE values (scatter_ from it is faster than from an expanded scalar)."""
    return _constant("free", n, lambda m: torch.full((m,), _FREE, dtype=torch.long))


def _best_paths_sorted(cand_ids: Tensor, score: Tensor, k: int, m: int) -> tuple[Tensor, Tensor]:
    """best_paths among the top `m` candidates of each row, widened (for the rows that need it) until exact.

    The k best distinct labels among a row's top m candidates are its k best overall when there are at least
    k of them: every candidate left out has no better path. Sort keys are label id, then path descending
    (the float bits of a non-negative path order like the path), so a label's first key is its best path.
    """
    B, N = cand_ids.shape
    k = min(k, N)
    m = min(max(m, k), N)
    if m < N:
        top, top_pos = torch.topk(score, m, dim=1, sorted=False)
    else:
        top, top_pos = score, torch.arange(N, device=score.device).expand(B, N)
    bits = top.clamp(min=0).view(torch.int32).long() & 0x7FFFFFFF
    key, order = torch.sort((cand_ids.gather(1, top_pos) << 31) | (0x7FFFFFFF - bits), dim=1)
    label = key >> 31
    first = torch.ones_like(label, dtype=torch.bool)
    first[:, 1:] = label[:, 1:] != label[:, :-1]
    path = top.gather(1, order)
    keep = first & (path >= 0)
    vals, j = torch.topk(torch.where(keep, path, -1.0), k, dim=1, sorted=False)
    pos, valid = top_pos.gather(1, order.gather(1, j)), vals >= 0
    distinct = keep.sum(1)
    short = (distinct < k).nonzero().squeeze(1)
    if m < N and len(short):
        # Widen by the distinct fraction seen so far (duplicates are common: a label sits in several rows of A).
        n = max(int(distinct[short].min()), 1)
        wider = max(2 * m, -(-m * k * 5 // (4 * n)))
        pos[short], valid[short] = _best_paths_sorted(cand_ids[short], score[short], k, wider)
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
    flat = ids.reshape(-1)
    if W_L_scale is not None:
        z = z * W_L_scale.index_select(0, flat).view_as(ids)
    return z + b_L.index_select(0, flat).view_as(ids)


def batch_label_logits(emb: Tensor, ids: Tensor, W_L: Tensor, b_L: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """w_l . phi + b_l for the (B, K) label ids of a training batch, differentiable, in float32.

    One GEMM of the batch against its distinct shortlisted labels (all of W_L when they are most of it), then a
    gather: gathering a (B, K, d) tensor of rows instead costs B*K*d memory forward and again for its gradient
    (1 GB at B = 256, K = 2000, d = 512) and runs at memory speed. `dtype` (default: emb's) is the GEMM's
    input type; bf16 is 3-4x faster than fp32 where the hardware has it (precision.py).
    """
    dtype = dtype or emb.dtype
    L = W_L.shape[0]
    present = torch.zeros(L, dtype=torch.bool, device=ids.device)
    present[ids.reshape(-1)] = True
    distinct = present.nonzero().squeeze(1)
    if distinct.numel() >= _DISTINCT_DENSE_FRACTION * L:
        rows, cols = W_L, ids
    else:
        slot = torch.cumsum(present, 0, dtype=torch.long) - 1  # slot[l]: label l's column among the distinct ones
        rows, cols = W_L.index_select(0, distinct), slot[ids]
    z = (emb.to(dtype) @ rows.to(dtype).T).float().gather(1, cols)
    return z + b_L.index_select(0, ids.reshape(-1)).view_as(ids)


def shortlist(
    s: Tensor,
    A_ids: Tensor,
    A_weights: Tensor,
    beam_size: int,
    shortlist_size: int,
    pad_id: int,
    forced_clusters: Tensor | None = None,
    partition: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 2-4: shortlisted label ids, their path scores, the cluster of each path, and a validity mask.

    `forced_clusters` (B, C) bool marks clusters that must be in the beam (teacher forcing in training).
    `partition`: A's rows are disjoint (stage 1), so every candidate is a distinct label and step 4 is a top-k.
    Gradients flow into `s` and `A_weights` through the returned path scores.
    """
    clusters, cand_ids, cand_path, pos, valid = shortlist_positions(
        s, A_ids, A_weights, beam_size, shortlist_size, pad_id, forced_clusters, partition)
    return (*gather_shortlist(clusters, cand_ids, cand_path, pos, valid), valid)


def gather_shortlist(clusters: Tensor, cand_ids: Tensor, cand_path: Tensor, pos: Tensor, valid: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The label ids, path scores (0 where not valid) and clusters at `shortlist_positions`' positions."""
    kappa = cand_ids.shape[1] // clusters.shape[1]
    return cand_ids.gather(1, pos), cand_path.gather(1, pos) * valid, clusters.gather(1, pos // kappa)


def shortlist_positions(
    s: Tensor,
    A_ids: Tensor,
    A_weights: Tensor,
    beam_size: int,
    shortlist_size: int,
    pad_id: int,
    forced_clusters: Tensor | None = None,
    partition: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`shortlist` before its gathers: the (B, beam) beam clusters, the (B, beam * kappa) candidate ids and path
    scores, and the (B, K) positions of the shortlisted candidates with their validity mask."""
    C = s.shape[1]
    select = s.detach()
    width = min(beam_size, C)
    if forced_clusters is not None:
        select = torch.where(forced_clusters, select + 2.0, select)  # scores are <= 1: forced ones rank first
        width = min(C, beam_size + int(forced_clusters.sum(1).max().item()))
    clusters = torch.topk(select, width, dim=1).indices
    cand_ids, cand_path = expand(clusters, s.gather(1, clusters), A_ids, A_weights)
    if partition:
        score = cand_path.detach().masked_fill(cand_ids == pad_id, -1.0)
        top, pos = torch.topk(score, min(shortlist_size, score.shape[1]), dim=1, sorted=False)
        valid = top >= 0
    else:
        pos, valid = best_paths(cand_ids, cand_path.detach(), shortlist_size, pad_id)
    return clusters, cand_ids, cand_path, pos, valid


@torch.inference_mode()
def search(
    emb: Tensor,
    t: SearchTensors,
    k: int = 100,
    beam_size: int = 20,
    shortlist_size: int = 2000,
    parts: int | None = None,
) -> SearchResult:
    """The five steps for a batch of query embeddings `emb` (B, d). Plain arrays in, plain arrays out.

    On the CPU a batch is split, after the one W_C product, into `parts` searched side by side (steps 3-5 run
    row by row in small ops that one thread cannot spread). None: a part per torch thread, each of at least
    _PARALLEL_MIN_ROWS queries. CUDA batches stay whole.
    """
    emb = emb.to(t.W_C.device, torch.float32)
    s = cluster_scores(cluster_logits(emb, t), t.alpha)
    if parts is None:
        parts = min(torch.get_num_threads(), emb.shape[0] // _PARALLEL_MIN_ROWS)
    parts = 1 if emb.is_cuda else min(parts, emb.shape[0])
    if parts <= 1:
        return _rank(emb, s, t, k, beam_size, shortlist_size)
    done = list(_row_pool(parts).map(lambda e, p: _rank(e, p, t, k, beam_size, shortlist_size),
                                     emb.tensor_split(parts), s.tensor_split(parts)))
    return SearchResult(*(torch.cat([getattr(r, f) for r in done]) for f in SearchResult.__dataclass_fields__))


def blocks_pay(emb: Tensor, clusters: Tensor, t: SearchTensors) -> bool:
    """Whether a CPU batch scores its labels by cluster blocks (cluster_blocks.py) instead of row gathers: only
    on a partition (stage 1's A, where a row's candidates are whole clusters' labels) and when the batch's beams
    put at least _BLOCK_ROWS queries on an average cluster. Then each used cluster's labels are read once for
    all the queries that reach it (offline evaluation: 2.4x faster at batch 1,024 on 32k labels, one thread),
    where a lone query's row gathers cost less than the grouping."""
    return t.partition and not emb.is_cuda and clusters.numel() >= _BLOCK_ROWS * t.num_clusters


@torch.inference_mode()  # also on the pool's threads: inference mode is per thread
def _rank(emb: Tensor, s: Tensor, t: SearchTensors, k: int, beam_size: int, shortlist_size: int) -> SearchResult:
    """Steps 3-5 for queries with cluster scores `s`: shortlist, label classifiers on it, the top k."""
    # A half-precision W_L: on CUDA the shortlist product runs in it; on the CPU (slow half GEMM) only the
    # shortlisted rows are converted (label_logits).
    half = emb.is_cuda and t.W_L.dtype in (torch.float16, torch.bfloat16)
    L = t.num_labels
    clusters, cand_ids, cand_path, pos, valid = shortlist_positions(
        s, t.A_ids, t.A_weights, beam_size, max(shortlist_size, k), L, partition=t.partition)
    ids, path, cluster = gather_shortlist(clusters, cand_ids, cand_path, pos, valid)
    safe_ids = torch.where(valid, ids, 0)  # a valid id is a label (< L), never the pad id
    if blocks_pay(emb, clusters, t):
        flat = safe_ids.reshape(-1)
        z = cluster_block_logits(emb, clusters, t.A_ids, t.W_L, emb.dtype).gather(1, pos)
        if t.W_L_scale is not None:
            z = z * t.W_L_scale.index_select(0, flat).view_as(z)
        z = z + t.b_L.index_select(0, flat).view_as(z)
    else:
        z = label_logits(emb.to(t.W_L.dtype) if half else emb, safe_ids, t.W_L, t.b_L, t.W_L_scale)
    prob = torch.sigmoid(z.float())
    final = torch.where(valid, path * prob, -1.0)
    k = min(k, final.shape[1])
    scores, top = torch.topk(final, k, dim=1)
    missing = scores < 0  # fewer than k labels reachable

    def pick(x: Tensor, fill: float) -> Tensor:
        return x.gather(1, top).masked_fill_(missing, fill)

    return SearchResult(ids=t.labels_of(pick(ids, -1)), scores=pick(final, 0.0), path=pick(path, 0.0),
                        label_prob=pick(prob, 0.0), cluster=pick(cluster, -1))


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# A forked child has none of the parent's pool threads: it must start its own pools, not wait on those.
os.register_at_fork(after_in_child=_pools.clear)


def _row_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool of `workers` threads for the parts of a batch (kept for the process's life)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="elias-search")
        return _pools[workers]
