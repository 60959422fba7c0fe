"""Training the ELIAS++ sparse ranker: one squared-hinge linear model per label on its hard negatives."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
from rich.progress import Progress
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from elias_retrieval.metrics import evaluate, hits
from elias_retrieval.reranker import SparseRanker
from trainer.svm_solver import LabelProblems


def fit_labels_reference(X: sp.csr_matrix, cand: sp.csc_matrix, Y: sp.csc_matrix, labels: np.ndarray, c: float,
                         threshold: float, seed: int = 0, tol: float = 0.1
                         ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The plain version of `train_ranker`'s fits: scikit-learn's LinearSVC per label (liblinear's dual solver),
    on the rows where `cand` holds the label, positive where `Y` does. Tests hold the fast route to it."""
    warnings.simplefilter("ignore", ConvergenceWarning)
    cols, vals, bias = [], [], np.zeros(len(labels), dtype=np.float32)
    for j, lab in enumerate(labels):
        rows = cand.indices[cand.indptr[lab]: cand.indptr[lab + 1]]
        y = np.isin(rows, Y.indices[Y.indptr[lab]: Y.indptr[lab + 1]])
        if len(rows) == 0 or y.all() or not y.any():
            bias[j] = 1.0 if len(rows) and y.all() else -1.0
            cols.append(np.zeros(0, dtype=np.int32))
            vals.append(np.zeros(0, dtype=np.float32))
            continue
        svm = LinearSVC(C=c, loss="squared_hinge", dual=True, tol=tol, max_iter=1000, random_state=seed)
        svm.fit(X[rows], y.astype(np.int8))
        w = svm.coef_.ravel()
        keep = np.flatnonzero(np.abs(w) >= threshold)
        cols.append(keep.astype(np.int32))
        vals.append(w[keep].astype(np.float32))
        bias[j] = float(svm.intercept_[0])
    return cols, vals, bias


def candidates(Y: sp.csr_matrix, shortlist_ids: np.ndarray) -> sp.csc_matrix:
    """(N, L) CSC: 1 where a training point's shortlist holds a label, 2 or 3 where the label is one of its
    positives (in the shortlist or not): every label's training rows, positives marked."""
    N, L = Y.shape
    valid = shortlist_ids >= 0
    rows = np.repeat(np.arange(N), shortlist_ids.shape[1])[valid.ravel()]
    short = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, shortlist_ids.ravel()[valid.ravel()])),
                          shape=(N, L))
    short.data[:] = 1.0  # a label twice in a row's shortlist is still one candidate
    cand = (short + 2 * (Y > 0).astype(np.float32)).tocsc()
    cand.sort_indices()
    return cand


SHALLOW_DEPTH, DEEP_DEPTH = 100, 300


# The budget's lowest rate: a kept negative's loss weight (1 / rate) above 4 makes the fit's loss too noisy (on
# Delicious, whose deep window holds many positives, 0.1 cost ELIAS++ 3.6 points of R@100 where 0.25 cost 0.3).
MIN_DEEP_KEEP = 0.25


def deep_keep_rate(configured: float, depth: int, deep_from: int) -> float:
    """The rate the negatives at rank `deep_from` or deeper are kept at: `configured`, or for 0 the budget of
    deep_from / 2 kept deep negatives per training point in expectation (every one when the window is that small),
    at no less than MIN_DEEP_KEEP."""
    if configured > 0:
        return configured
    return min(1.0, max(MIN_DEEP_KEEP, (deep_from / 2) / max(1, depth - deep_from)))


def sample_deep_negatives(Y: sp.csr_matrix, shortlist_ids: np.ndarray, start: int, keep: float, seed: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The shortlists with each negative at rank `start` or deeper kept with probability `keep` (the others set to
    -1; positives always kept), and each entry's loss weight: 1 / keep for the kept deep negatives, so they stand
    for the dropped ones, else 1."""
    ids = shortlist_ids.copy()
    weights = np.ones(ids.shape, dtype=np.float32)
    if keep >= 1.0 or start >= ids.shape[1]:
        return ids, weights
    deep = ids[:, start:]
    rng = np.random.default_rng(seed)
    negative = (deep >= 0) & (hits(deep, Y) == 0)
    drop = negative & (rng.random(deep.shape) >= keep)
    weights[:, start:] = np.where(negative, 1.0 / keep, 1.0)
    deep[drop] = -1
    return ids, weights


def weighted_candidates(Y: sp.csr_matrix, shortlist_ids: np.ndarray, weights: np.ndarray
                        ) -> tuple[sp.csc_matrix, np.ndarray]:
    """`candidates` and each of its entries' loss weight, from per-shortlist-entry `weights` (1 for positives
    outside the shortlists)."""
    cand = candidates(Y, shortlist_ids)
    valid = (shortlist_ids >= 0).ravel()
    rows = np.repeat(np.arange(Y.shape[0]), shortlist_ids.shape[1])[valid]
    extra = sp.csr_matrix(((weights.ravel()[valid] - 1.0).astype(np.float32), (rows, shortlist_ids.ravel()[valid])),
                          shape=Y.shape)
    extra.eliminate_zeros()
    w = ((cand != 0).astype(np.float32) + extra).tocsc()  # extra's entries lie within cand's
    w.sort_indices()
    if w.nnz != cand.nnz or not np.array_equal(w.indices, cand.indices):
        raise AssertionError("shortlist weights outside the candidates")
    return cand, w.data


# Upper bound on the weights one batch of label fits may write before pruning (entries of 8 bytes).
_BATCH_ENTRIES = 1 << 25


def train_ranker(
    X: sp.csr_matrix,
    Y: sp.csr_matrix,
    shortlist_ids: np.ndarray,
    c: float = 1.0,
    threshold: float = 0.1,
    n_jobs: int = 2,
    progress: bool = False,
    seed: int = 0,
    deep_keep: float = 1.0,
    deep_from: int = SHALLOW_DEPTH,
    tol: float = 0.1,
) -> SparseRanker:
    """Per label: the training points whose shortlist holds it (hard negatives) plus its positives, one
    squared-hinge SVM (trainer/svm_solver.py); weights below `threshold` in magnitude pruned. With `deep_keep`
    below 1 the negatives at rank `deep_from` or deeper are sampled at that rate and weighted up
    (`sample_deep_negatives`): the fit's cost falls with the pairs it trains on, the loss stays unbiased; 0 is the
    budget of `deep_keep_rate`. `tol`: each fit's stopping tolerance (`LabelProblems.solve`)."""
    L = Y.shape[1]
    Y = Y.tocsr()
    deep_keep = deep_keep_rate(deep_keep, shortlist_ids.shape[1], deep_from)
    if deep_keep < 1.0 and shortlist_ids.shape[1] > deep_from:
        ids, weights = sample_deep_negatives(Y, shortlist_ids, deep_from, deep_keep, seed)
        cand, cand_weight = weighted_candidates(Y, ids, weights)
    else:
        cand, cand_weight = candidates(Y, shortlist_ids), None
    problems = LabelProblems(X, cand.indptr, cand.indices, cand.data >= 2, cand_weight)
    all_cols: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * L
    all_vals: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * L
    bias = np.zeros(L, dtype=np.float32)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ELIAS++: training the sparse ranker", total=L)
        for batch in _label_batches(problems.bounds, max(1, L // 64)):
            cols, vals, b = problems.solve(batch, c, threshold, tol=tol, seed=seed, n_jobs=n_jobs)
            for lab, cc, vv in zip(batch, cols, vals, strict=True):
                all_cols[lab], all_vals[lab] = cc, vv
            bias[batch] = b
            bar.advance(task, len(batch))
    indptr = np.zeros(L + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(cc) for cc in all_cols])
    W = sp.csr_matrix((np.concatenate(all_vals), np.concatenate(all_cols), indptr), shape=(L, X.shape[1]))
    return SparseRanker(W, bias)


def _label_batches(bounds: np.ndarray, max_labels: int) -> list[np.ndarray]:
    """Consecutive label ranges of at most `max_labels` labels and `_BATCH_ENTRIES` output entries (a label
    larger than that alone)."""
    batches, start, total = [], 0, 0
    for lab, size in enumerate(bounds.tolist()):
        if lab > start and (lab - start >= max_labels or total + size > _BATCH_ENTRIES):
            batches.append(np.arange(start, lab))
            start, total = lab, 0
        total += size
    if start < len(bounds):
        batches.append(np.arange(start, len(bounds)))
    return batches

MISSED_FRACTION = 0.05


def choose_depth(dev_ids: np.ndarray, y_dev: sp.csr_matrix, num_labels: int) -> tuple[int, float]:
    """The ranker's depth for `reranker_depth = 0`: DEEP_DEPTH when more than MISSED_FRACTION of the dev positives
    in ELIAS's top DEEP_DEPTH (`dev_ids`, ranked) lie below rank SHALLOW_DEPTH, else SHALLOW_DEPTH; never more than
    the number of labels. Also returns that fraction.

    The window costs the ranker's fit and search in proportion to its depth, and pays only through the positives
    it adds below rank 100, which are mostly rare labels: a head-heavy label set keeps the shallow window.
    """
    h = hits(dev_ids[:, :DEEP_DEPTH], y_dev)
    deep = int(h.sum())
    missed = float(h[:, SHALLOW_DEPTH:].sum() / deep) if deep else 0.0
    depth = DEEP_DEPTH if missed > MISSED_FRACTION else SHALLOW_DEPTH
    return max(SHALLOW_DEPTH, min(depth, num_labels)), missed


FUSION_WEIGHTS = (0.0, 0.2, 0.35, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0)


def choose_fusion_weight(
    ranker: SparseRanker,
    X_dev: sp.csr_matrix,
    ids: np.ndarray,
    scores: np.ndarray,
    y_dev: sp.csr_matrix,
    label_counts: np.ndarray,
    num_train: int,
    metric: str = "P@5",
    grid: tuple[float, ...] = FUSION_WEIGHTS,
) -> tuple[float, dict[float, float]]:
    """The fusion weight that maximises `metric` on the dev split, and `metric` for each weight of `grid`."""
    margins = ranker.margins(X_dev, ids)
    results: dict[float, float] = {}
    for w in grid:
        fused = np.where(ids >= 0, ranker.fuse(scores, margins, w), -1.0)
        order = np.argsort(-fused, axis=1, kind="stable")
        results[w] = evaluate(np.take_along_axis(ids, order, 1), y_dev, label_counts, num_train)[metric]
    best = max(results, key=lambda w: results[w])
    return best, results


def choose_pruning(
    ranker: SparseRanker,
    thresholds: list[float],
    X_dev: sp.csr_matrix,
    ids: np.ndarray,
    scores: np.ndarray,
    y_dev: sp.csr_matrix,
    label_counts: np.ndarray,
    num_train: int,
    metric: str = "P@5",
) -> tuple[float, float, dict[float, dict[float, float]]]:
    """The pruning threshold and fusion weight that maximise `metric` on the dev split (ties: the larger
    threshold, a smaller ranker), and `metric` per threshold and weight. `ranker` is fitted at the smallest."""
    results: dict[float, dict[float, float]] = {}
    best: tuple[float, float, float] | None = None
    for thr in sorted(set(thresholds), reverse=True):
        w, by_weight = choose_fusion_weight(ranker.pruned(thr), X_dev, ids, scores, y_dev, label_counts, num_train,
                                            metric)
        results[thr] = by_weight
        if best is None or by_weight[w] > best[0]:
            best = (by_weight[w], thr, w)
    assert best is not None
    return best[1], best[2], results
