"""AnnBaseline: faiss indexes over W_L with the bias folded in, checked against exact numpy top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elias_retrieval.baseline import AnnBaseline, default_nlist
from elias_retrieval.search import SearchTensors
from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

L, D = 1500, 24


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(L, D)).astype(np.float32)
    b = rng.normal(scale=2.0, size=L).astype(np.float32)
    q = rng.normal(size=(40, D)).astype(np.float32)
    return W, b, q


def _exact(W: np.ndarray, b: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ W.T + b
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def _recall(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(r)) / len(r) for a, r in zip(ids.tolist(), ref.tolist(), strict=True)]))


def test_flat_equals_exact_topk_with_the_bias():
    W, b, q = _data()
    ann = AnnBaseline.build(W, b, "flat")
    ids, scores = ann.search(q, 10)
    ref_ids, ref_scores = _exact(W, b, q, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (40, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=1e-5)
    assert (ids == ref_ids).mean() > 0.99  # equal up to ties within float error
    np.testing.assert_allclose(np.take_along_axis(q @ W.T + b, ids, 1), scores, atol=1e-4, rtol=1e-5)
    assert ann.method == "Flat (faiss)" and ann.dim == D and ann.num_labels == L


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_centring_keeps_the_scores_and_the_ranking(kind):
    W, b, q = _data(4)
    W = W + 3.0  # a direction every label shares, as trained label vectors have
    ref_ids, ref_scores = _exact(W, b, q, 10)
    ann = AnnBaseline.build(W, b, kind, center=True)
    assert ann.center is not None
    ids, scores = ann.search(q, 10, **({"ef_search": 400} if kind == "hnsw" else {}))
    np.testing.assert_allclose(scores, ref_scores, atol=2e-4, rtol=1e-5)
    assert (ids == ref_ids).mean() > 0.98


def test_torch_inputs_and_a_single_query_vector():
    W, b, q = _data(1)
    ann = AnnBaseline.build(torch.from_numpy(W).half(), torch.from_numpy(b), "flat")
    ids, _ = ann.search(torch.from_numpy(q[0]), 5)
    assert ids.shape == (1, 5)
    assert ids[0].tolist() == _exact(W.astype(np.float16).astype(np.float32), b, q[:1], 5)[0][0].tolist()


@pytest.mark.parametrize(("kind", "kw"), [("hnsw", {"ef_search": 256}), ("ivf", {"nprobe": 80})])
def test_approximate_kinds_reach_high_recall_against_flat(kind, kw):
    W, b, q = _data(2)
    ref, _ = AnnBaseline.build(W, b, "flat").search(q, 20)
    ann = AnnBaseline.build(W, b, kind, threads=1)
    ids, scores = ann.search(q, 20, **kw)
    assert _recall(ids, ref) >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    if kind == "ivf":
        assert ann.nlist == default_nlist(L) == 155


def test_ivf_with_every_list_probed_is_exact():
    W, b, q = _data(3)
    ann = AnnBaseline.build(W, b, "ivf", nlist=16)
    ref, _ = _exact(W, b, q, 10)
    assert _recall(ann.search(q, 10, nprobe=16)[0], ref) > 0.99


def test_the_bias_decides_the_top1():
    # Label 0 matches the query best by w . phi, but label 1's bias puts it first.
    W = np.array([[1.0, 0.0], [0.8, 0.0], [0.0, 1.0]], dtype=np.float32)
    b = np.array([0.0, 0.5, 0.0], dtype=np.float32)
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    for kind in ("flat", "hnsw", "ivf"):
        ann = AnnBaseline.build(W, b, kind, nlist=1 if kind == "ivf" else None)
        ids, scores = ann.search(q, 2)
        assert ids[0].tolist() == [1, 0], kind
        np.testing.assert_allclose(scores[0], [1.3, 1.0], atol=1e-5)
        assert AnnBaseline.build(W, np.zeros(3, np.float32), kind, nlist=1 if kind == "ivf" else None
                                 ).search(q, 1)[0][0, 0] == 0


def test_k_beyond_the_labels_is_padded():
    W, b, q = _data()
    ids, scores = AnnBaseline.build(W[:5], b[:5], "flat").search(q[:2], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all() and (ids[:, :5] >= 0).all()


def test_from_search_tensors_dequantises_int8():
    t = synthetic_tensors(800, dim=16, kappa=50, num_clusters=8, dtype="fp32")
    scale = t.W_L.abs().amax(1) / 127
    q8 = SearchTensors(t.W_C, t.b_C, t.A_ids, t.A_weights, torch.round(t.W_L / scale[:, None]).to(torch.int8), t.b_L,
                       t.alpha, scale)
    emb, labels = synthetic_queries(t, 30)
    exact = AnnBaseline.from_searcher(t, "flat").search(emb, 5)[0]
    ids = AnnBaseline.from_searcher(q8, "flat").search(emb, 5)[0]
    assert (ids[:, 0] == exact[:, 0]).mean() > 0.9
    assert (exact[:, 0] == labels.numpy()).mean() > 0.8  # mostly the planted label


def test_bad_arguments_raise_clear_errors():
    W, b, q = _data()
    with pytest.raises(ValueError, match="unknown baseline kind 'lsh'"):
        AnnBaseline.build(W, b, "lsh")
    with pytest.raises(ValueError, match="b_L must have shape"):
        AnnBaseline.build(W, b[:-1], "flat")
    with pytest.raises(ValueError, match="nlist"):
        AnnBaseline.build(W, b, "ivf", nlist=L + 1)
    ann = AnnBaseline.build(W, b, "hnsw")
    with pytest.raises(ValueError, match=rf"shape \(B, {D}\), got \(40, 23\)"):
        ann.search(q[:, :-1], 5)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be at least 1"):
            ann.search(q, k)
    with pytest.raises(ValueError, match="ef_search must be at least 1"):
        ann.search(q, 5, ef_search=0)
    with pytest.raises(ValueError, match="nprobe applies to the ivf baseline only"):
        ann.search(q, 5, nprobe=4)
