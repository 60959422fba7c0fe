"""The ELIAS++ ranker's batched per-label SVM fits (trainer/svm_solver.py) against scikit-learn's LinearSVC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from elias_retrieval.config import DataConfig, FeatureConfig
from elias_retrieval.data import read_split
from elias_retrieval.features import TfidfFeaturizer
from trainer import reranker
from trainer.reranker import candidates, fit_labels_reference, train_ranker
from trainer.svm_solver import LabelProblems

BIBTEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "xc" / "bibtex"


def synthetic_problem(n: int = 400, f: int = 300, L: int = 40, seed: int = 0):
    """Sparse points whose labels depend on a few features each, and random top-20 shortlists."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, f, density=0.05, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.abs(X.data)
    W = sp.random(L, f, density=0.1, random_state=seed + 1).toarray()
    scores = X @ W.T
    Y = sp.csr_matrix((scores > np.quantile(scores, 0.95, axis=0)).astype(np.float32))
    short = np.where(rng.random((n, 20)) < 0.9, rng.integers(0, L, size=(n, 20)), -1)
    return X, Y, short


def dense(cols: list[np.ndarray], vals: list[np.ndarray], f: int) -> np.ndarray:
    out = np.zeros((len(cols), f))
    for j, (c, v) in enumerate(zip(cols, vals, strict=True)):
        out[j, c] = v
    return out


def real_problem():
    if not BIBTEX.is_dir():
        pytest.skip("needs ../shared/data/xc/bibtex")
    d = read_split(BIBTEX, "train", DataConfig())
    _, X = TfidfFeaturizer.fit_transform(d, FeatureConfig())
    Y = d.known_labels().tocsr()
    short = np.random.default_rng(0).integers(0, Y.shape[1], size=(Y.shape[0], 20))
    return X, Y, short


@pytest.mark.parametrize("problem", ["synthetic", "bibtex"])
def test_the_fast_fits_equal_liblinears_solution(problem: str):
    X, Y, short = synthetic_problem() if problem == "synthetic" else real_problem()
    cand = candidates(Y, short)
    labels = np.arange(Y.shape[1])
    rc, rv, rb = fit_labels_reference(X, cand, Y.tocsc(), labels, 1.0, 0.0, tol=1e-5)
    fc, fv, fb = LabelProblems(X, cand.indptr, cand.indices, cand.data >= 2).solve(labels, tol=1e-5, n_jobs=2,
                                                                                    max_iter=1000)
    ref, fast = dense(rc, rv, X.shape[1]), dense(fc, fv, X.shape[1])
    # One strictly convex problem per label: both solvers converge to its unique optimum.
    np.testing.assert_allclose(fast, ref, atol=2e-3 * max(1.0, np.abs(ref).max()))
    np.testing.assert_allclose(fb, rb, atol=2e-3)
    trained = np.flatnonzero(np.abs(ref).sum(1) > 0)
    assert len(trained) > Y.shape[1] // 2  # most labels have both classes, so the comparison means something


def test_labels_without_both_classes_get_a_constant_answer():
    X = sp.csr_matrix(np.eye(4, dtype=np.float32))
    # label 0: no rows; label 1: only positives; label 2: only negatives; label 3: both
    cand_ptr = np.array([0, 0, 2, 4, 7])
    cand_rows = np.array([0, 1, 2, 3, 0, 1, 2])
    cand_pos = np.array([True, True, False, False, True, False, False])
    cols, vals, bias = LabelProblems(X, cand_ptr, cand_rows, cand_pos).solve(np.arange(4))
    assert [len(c) for c in cols[:3]] == [0, 0, 0]
    assert bias[:3].tolist() == [-1.0, 1.0, -1.0]
    w = dense(cols, vals, 4)[3]
    assert w[0] > 0 > w[1] and w[2] < 0 and w[3] == 0  # row 3 is not one of label 3's rows


def test_a_row_weighted_2_counts_as_the_row_twice():
    X, Y, short = synthetic_problem(seed=11)
    cand = candidates(Y, short)
    weight = np.where(np.arange(cand.nnz) % 3 == 0, 2.0, 1.0)
    labels = np.arange(Y.shape[1])
    wc, wv, wb = LabelProblems(X, cand.indptr, cand.indices, cand.data >= 2, weight).solve(
        labels, tol=1e-6, max_iter=2000)
    reps = weight.astype(np.int64)  # the same problems with each weight-2 row stored twice
    counts = np.add.reduceat(reps, cand.indptr[:-1]) * (np.diff(cand.indptr) > 0)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    dc, dv, db = LabelProblems(X, ptr, np.repeat(cand.indices, reps), np.repeat(cand.data >= 2, reps)).solve(
        labels, tol=1e-6, max_iter=2000)
    ref = dense(dc, dv, X.shape[1])
    np.testing.assert_allclose(dense(wc, wv, X.shape[1]), ref, atol=2e-3 * max(1.0, np.abs(ref).max()))
    np.testing.assert_allclose(wb, db, atol=2e-3)
    plain = dense(*LabelProblems(X, cand.indptr, cand.indices, cand.data >= 2).solve(labels, tol=1e-6)[:2],
                  X.shape[1])
    assert np.abs(plain - ref).max() > 1e-2  # the weights change the solution


def test_deep_negatives_are_sampled_and_weighted_up_positives_kept():
    rng = np.random.default_rng(0)
    N, L, depth = 400, 500, 60
    short = np.stack([rng.permutation(L)[:depth] for _ in range(N)])
    short[:, -3:] = -1
    Y = sp.csr_matrix((np.ones(N * 2, dtype=np.float32), (np.repeat(np.arange(N), 2), short[:, [5, 40]].ravel())),
                      shape=(N, L))
    ids, weights = reranker.sample_deep_negatives(Y, short, 20, 0.25, seed=1)
    np.testing.assert_array_equal(ids[:, :20], short[:, :20])
    np.testing.assert_array_equal(ids[:, 40], short[:, 40])  # a positive below the start stays, weight 1
    assert (weights[:, :20] == 1).all() and (weights[:, 40] == 1).all() and (ids[:, -3:] == -1).all()
    deep_neg = np.ones((N, depth - 20), dtype=bool)
    deep_neg[:, 20] = False
    deep_neg[:, -3:] = False
    kept = (ids[:, 20:] >= 0) & deep_neg
    assert abs(kept.sum() / deep_neg.sum() - 0.25) < 0.02
    assert (weights[:, 20:][kept] == 4.0).all()
    cand, w = reranker.weighted_candidates(Y, ids, weights)
    np.testing.assert_array_equal(cand.toarray(), candidates(Y, ids).toarray())
    assert np.isclose(w.sum(), weights[ids >= 0].sum())


def test_the_sampling_starts_at_deep_from(monkeypatch: pytest.MonkeyPatch):
    X, Y, short = synthetic_problem(seed=3)
    starts: list[int] = []
    sample = reranker.sample_deep_negatives
    monkeypatch.setattr(reranker, "sample_deep_negatives", lambda *a, **k: (starts.append(a[2]), sample(*a, **k))[1])
    plain = train_ranker(X, Y, short, threshold=0.01, n_jobs=1)
    assert (train_ranker(X, Y, short, threshold=0.01, n_jobs=1, deep_keep=0.5, deep_from=short.shape[1]).W
            != plain.W).nnz == 0  # nothing that deep: not sampled
    sampled = train_ranker(X, Y, short, threshold=0.01, n_jobs=1, deep_keep=0.5, deep_from=short.shape[1] // 2)
    assert starts == [short.shape[1] // 2] and (sampled.W != plain.W).nnz > 0


def test_the_stopping_tolerance_reaches_the_fits_and_a_tighter_one_lands_nearer_the_optimum():
    X, Y, short = synthetic_problem(seed=3)
    cand = candidates(Y, short)
    labels = np.arange(Y.shape[1])
    rc, rv, _ = fit_labels_reference(X, cand, Y.tocsc(), labels, 1.0, 0.0, tol=1e-6)
    optimum = dense(rc, rv, X.shape[1])
    gaps = {}
    for tol in (1.0, 0.3, 1e-3):
        ranker = train_ranker(X, Y, short, threshold=0.0, n_jobs=1, tol=tol)
        gaps[tol] = np.abs(ranker.W.toarray() - optimum).max()
    assert gaps[1.0] > gaps[0.3] > gaps[1e-3]
    assert gaps[1e-3] < 1e-2 * max(1.0, np.abs(optimum).max())


def test_threshold_seed_and_threads():
    X, Y, short = synthetic_problem(seed=3)
    cand = candidates(Y, short)
    p = LabelProblems(X, cand.indptr, cand.indices, cand.data >= 2)
    labels = np.arange(Y.shape[1])
    c1, v1, b1 = p.solve(labels, threshold=0.0, n_jobs=1, seed=5)
    c2, v2, b2 = p.solve(labels, threshold=0.0, n_jobs=2, seed=5)
    np.testing.assert_array_equal(dense(c1, v1, X.shape[1]), dense(c2, v2, X.shape[1]))  # deterministic per seed
    np.testing.assert_array_equal(b1, b2)
    ct, vt, bt = p.solve(labels, threshold=0.2, n_jobs=2, seed=5)
    full = dense(c1, v1, X.shape[1])
    np.testing.assert_array_equal(dense(ct, vt, X.shape[1]), np.where(np.abs(full) >= 0.2, full, 0.0))
    assert all((np.diff(c) > 0).all() for c in ct)  # sorted feature ids
    assert sum(len(c) for c in ct) < sum(len(c) for c in c1)


def test_candidates_count_a_repeated_shortlist_entry_once_and_add_missed_positives():
    Y = sp.csr_matrix(np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32))
    short = np.array([[1, 1, -1], [0, 2, -1]])
    cand = candidates(Y, short).toarray()
    np.testing.assert_array_equal(cand, [[2, 1, 0], [1, 0, 3]])


def test_train_ranker_in_small_batches_gives_the_same_ranker(monkeypatch: pytest.MonkeyPatch):
    X, Y, short = synthetic_problem(seed=7)
    whole = train_ranker(X, Y, short, threshold=0.01, n_jobs=2)
    monkeypatch.setattr(reranker, "_BATCH_ENTRIES", 50)
    batches = reranker._label_batches(LabelProblems(X, *_parts(Y, short)).bounds, 64)
    assert len(batches) > 5 and np.array_equal(np.concatenate(batches), np.arange(Y.shape[1]))
    pieces = train_ranker(X, Y, short, threshold=0.01, n_jobs=2)
    assert (whole.W != pieces.W).nnz == 0 and np.array_equal(whole.bias, pieces.bias)
    assert whole.W.nnz > 0


def _parts(Y: sp.csr_matrix, short: np.ndarray):
    cand = candidates(Y, short)
    return cand.indptr, cand.indices, cand.data >= 2
