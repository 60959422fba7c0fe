"""Many small squared-hinge linear SVMs at once: the ELIAS++ ranker's per-label fits, compiled with numba.

Each label's problem is liblinear's L2-regularised L2-loss SVC solved in the dual (Hsieh et al., ICML 2008,
"A dual coordinate descent method for large-scale linear SVM"; the solver scikit-learn's `LinearSVC(dual=True)`
calls), with a bias feature of value 1 that is regularised like the others (`intercept_scaling=1`):

    min_w  0.5 |w|^2 + C sum_i c_i max(0, 1 - y_i w.x_i)^2

with per-row weights c_i (1 unless the caller sampled rows and weights the kept ones up to stand for the rest).

Coordinate descent over the dual variables alpha_i >= 0 with w = sum_i alpha_i y_i x_i, liblinear's shrinking
and its stopping rule (the projected gradient's spread below `tol`). Labels are solved in parallel, one per task,
the costliest first; each copies its rows out of one CSR matrix into its own feature ids (per-thread scratch), so
its passes stream through contiguous memory and a weight vector the size of its own feature set.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
from numba import njit, prange


@njit(cache=True, nogil=True)
def _solve_one(ptr, idx, val, sqnorm, y, cw, c, tol, max_iter, seed, w, alpha, order, qd, diag):
    """One label's dual coordinate descent. Its n points are rows `ptr[s]:ptr[s + 1]` of (idx, val), in the
    label's own feature ids; y their +-1 targets, cw their weights; w (its features + 1,) zero on entry, the
    solution on exit (bias last)."""
    n = y.shape[0]
    bias_col = w.shape[0] - 1
    for s in range(n):
        alpha[s] = 0.0
        order[s] = s
        diag[s] = 0.5 / (c * cw[s])
        qd[s] = sqnorm[s] + 1.0 + diag[s]
    state = np.uint64(seed) * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    active = n
    pg_max_old = np.inf  # liblinear's shrinking bound (no upper bound on alpha here, so only this side)
    it = 0
    while it < max_iter:
        pg_max_new, pg_min_new = -np.inf, np.inf
        for s in range(active):  # shuffle the active set (an LCG: deterministic for a given seed)
            state = state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
            j = s + np.int64((state >> np.uint64(33)) % np.uint64(active - s))
            order[s], order[j] = order[j], order[s]
        s = 0
        while s < active:
            k = order[s]
            dot = w[bias_col]
            for p in range(ptr[k], ptr[k + 1]):
                dot += w[idx[p]] * val[p]
            g = y[k] * dot - 1.0 + alpha[k] * diag[k]
            pg = 0.0
            if alpha[k] == 0.0:
                if g > pg_max_old:  # shrink: this point stays at its bound
                    active -= 1
                    order[s], order[active] = order[active], order[s]
                    continue
                if g < 0.0:
                    pg = g
            else:
                pg = g
            pg_max_new = max(pg_max_new, pg)
            pg_min_new = min(pg_min_new, pg)
            if abs(pg) > 1e-12:
                old = alpha[k]
                alpha[k] = max(old - g / qd[k], 0.0)
                d = (alpha[k] - old) * y[k]
                for p in range(ptr[k], ptr[k + 1]):
                    w[idx[p]] += d * val[p]
                w[bias_col] += d
            s += 1
        it += 1
        if pg_max_new - pg_min_new <= tol:
            if active == n:
                break
            active = n  # converged on the active set: check every point once more
            pg_max_old = np.inf
            continue
        pg_max_old = pg_max_new if pg_max_new > 0.0 else np.inf


@njit(parallel=True, cache=True)
def _solve_labels(indptr, indices, data, sqnorm, num_features, cand_ptr, cand_rows, cand_pos, cand_weight, labels, c,
                  tol,
                  max_iter, seed, threshold, out_ptr, out_idx, out_val, counts, bias, threads, max_rows, max_entries):
    """Solve `labels` in parallel, one label per task (callers put the costliest first); label j's kept weights go
    to out_idx/out_val[out_ptr[j]:], their number to counts[j], its bias to bias[j]."""
    # Per thread: the global -> local feature map (-1: unused), and the label's rows copied into its own feature
    # ids, so its iterations stream through contiguous memory and a small dense w.
    max_feats = min(max_entries, num_features)
    local = np.full((threads, num_features), -1, dtype=np.int32)
    glob = np.empty((threads, max_feats), dtype=np.int32)
    idx = np.empty((threads, max_entries), dtype=np.int32)
    val = np.empty((threads, max_entries), dtype=np.float32)
    ptr = np.empty((threads, max_rows + 1), dtype=np.int64)
    norms = np.empty((threads, max_rows))
    w = np.zeros((threads, max_feats + 1))
    alpha = np.empty((threads, max_rows))
    order = np.empty((threads, max_rows), dtype=np.int64)
    qd = np.empty((threads, max_rows))
    diag = np.empty((threads, max_rows))
    y = np.empty((threads, max_rows))
    cw = np.empty((threads, max_rows))
    for j in prange(labels.shape[0]):
        t = numba.get_thread_id()
        lab = labels[j]
        lo, hi = cand_ptr[lab], cand_ptr[lab + 1]
        n = hi - lo
        npos = 0
        for s in range(n):
            y[t, s] = 1.0 if cand_pos[lo + s] else -1.0
            cw[t, s] = cand_weight[lo + s]
            npos += cand_pos[lo + s]
        counts[j] = 0
        if n == 0 or npos == 0 or npos == n:  # nothing to separate: a constant answer
            bias[j] = 1.0 if n > 0 and npos == n else -1.0
            continue
        m = 0  # the label's features so far
        e = 0  # entries copied
        ptr[t, 0] = 0
        for s in range(n):
            i = cand_rows[lo + s]
            for p in range(indptr[i], indptr[i + 1]):
                f = indices[p]
                if local[t, f] < 0:
                    local[t, f] = m
                    glob[t, m] = f
                    m += 1
                idx[t, e] = local[t, f]
                val[t, e] = data[p]
                e += 1
            ptr[t, s + 1] = e
            norms[t, s] = sqnorm[i]
        wl = w[t, : m + 1]
        _solve_one(ptr[t], idx[t], val[t], norms[t], y[t, :n], cw[t], c, tol, max_iter, seed + lab, wl, alpha[t],
                   order[t], qd[t], diag[t])
        bias[j] = wl[m]
        out = out_ptr[j]
        kept = 0
        for q in range(m):
            if abs(wl[q]) >= threshold:
                out_idx[out + kept] = glob[t, q]
                out_val[out + kept] = wl[q]
                kept += 1
            wl[q] = 0.0
            local[t, glob[t, q]] = -1
        wl[m] = 0.0
        counts[j] = kept


class LabelProblems:
    """The per-label problems over one training set. X: (N, F) CSR training points; label l trains on the rows
    `cand_rows[cand_ptr[l]:cand_ptr[l + 1]]`, positive where `cand_pos` is true there, each row's loss weighted by
    `cand_weight` there (default 1)."""

    def __init__(self, X, cand_ptr: np.ndarray, cand_rows: np.ndarray, cand_pos: np.ndarray,
                 cand_weight: np.ndarray | None = None):
        X = X.tocsr()
        self.num_features = X.shape[1]
        # Features renumbered by document frequency, most frequent first: most stored entries then fall on a few
        # thousand low ids, whose entries of the per-thread feature map stay in the cache while rows are copied.
        df = np.bincount(X.indices, minlength=self.num_features)
        self.feature_of = np.argsort(-df, kind="stable").astype(np.int32)  # new id -> feature
        new_id = np.empty(self.num_features, dtype=np.int32)
        new_id[self.feature_of] = np.arange(self.num_features, dtype=np.int32)
        Xr = sp.csr_matrix((X.data.astype(np.float32), new_id[X.indices], X.indptr), shape=X.shape)
        Xr.sort_indices()
        self.indptr = Xr.indptr.astype(np.int64)
        self.indices = Xr.indices.astype(np.int32)
        self.data = Xr.data
        self.sqnorm = np.asarray(X.multiply(X).sum(1), dtype=np.float64).ravel()
        self.cand_ptr = np.asarray(cand_ptr, np.int64)
        self.cand_rows = np.asarray(cand_rows, np.int64)
        self.cand_pos = np.asarray(cand_pos, np.bool_)
        self.cand_weight = np.ones(len(self.cand_rows)) if cand_weight is None else np.asarray(cand_weight, np.float64)
        per_pair = np.diff(self.indptr)[self.cand_rows]
        cum = np.zeros(len(per_pair) + 1, dtype=np.int64)
        np.cumsum(per_pair, out=cum[1:])
        # Per label, the stored entries of its rows (the work of one pass over them), and a bound on the weights
        # its fit can write out.
        self.entries = cum[self.cand_ptr[1:]] - cum[self.cand_ptr[:-1]]
        self.bounds = np.minimum(self.entries, self.num_features)

    def solve(self, labels: np.ndarray, c: float = 1.0, threshold: float = 0.0, tol: float = 0.1,
              max_iter: int = 200, seed: int = 0, n_jobs: int = 1
              ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Fit one squared-hinge SVM per label of `labels`: per label the feature ids (sorted) and weights of
        magnitude at least `threshold`, and the biases. A label whose rows are all positive or all negative (or
        that has none) gets no weights and bias +1 or -1."""
        labels = np.asarray(labels, dtype=np.int64)
        out_ptr = np.zeros(len(labels) + 1, dtype=np.int64)
        np.cumsum(self.bounds[labels], out=out_ptr[1:])
        out_idx = np.empty(out_ptr[-1], dtype=np.int32)
        out_val = np.empty(out_ptr[-1], dtype=np.float32)
        counts = np.zeros(len(labels), dtype=np.int64)
        bias = np.zeros(len(labels), dtype=np.float32)
        if len(labels):
            # The costliest labels first, and a thread takes the next label when it is free: the call ends when
            # its last label does, so the long ones must not come last.
            first = np.argsort(-self.entries[labels], kind="stable")
            ordered = labels[first]
            counts_o, bias_o = np.zeros_like(counts), np.zeros_like(bias)
            previous = numba.get_num_threads()
            threads = max(1, min(int(n_jobs), numba.config.NUMBA_NUM_THREADS))
            numba.set_num_threads(threads)
            try:
                with numba.parallel_chunksize(1):
                    _solve_labels(self.indptr, self.indices, self.data, self.sqnorm, self.num_features,
                                  self.cand_ptr, self.cand_rows, self.cand_pos, self.cand_weight, ordered, float(c),
                                  float(tol), int(max_iter), int(seed), float(threshold), out_ptr[first], out_idx,
                                  out_val, counts_o, bias_o, threads, int((self.cand_ptr[ordered + 1] - self.cand_ptr[
                                      ordered]).max()), int(self.entries[ordered].max()))
            finally:
                numba.set_num_threads(previous)
            counts[first], bias[first] = counts_o, bias_o
        cols, vals = [], []
        for j in range(len(labels)):
            lo = out_ptr[j]
            idx, val = self.feature_of[out_idx[lo: lo + counts[j]]], out_val[lo: lo + counts[j]]
            o = np.argsort(idx, kind="stable")
            cols.append(idx[o])
            vals.append(val[o])
        return cols, vals, bias
