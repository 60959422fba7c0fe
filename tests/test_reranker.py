"""The ELIAS++ ranker's pruning, and choosing its pruning threshold and fusion weight on dev."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from elias_retrieval.config import ConfigError, EliasConfig
from elias_retrieval.reranker import SparseRanker
from trainer.reranker import choose_depth, choose_pruning


def test_pruned_drops_small_weights_and_leaves_the_original_alone():
    W = sp.csr_matrix(np.array([[0.08, -0.2, 0.0], [0.0, 0.04, -0.06]], dtype=np.float32))
    r = SparseRanker(W, np.array([0.5, -0.5], dtype=np.float32), fusion_weight=0.7)
    p = r.pruned(0.07)
    np.testing.assert_allclose(p.W.toarray(), [[0.08, -0.2, 0.0], [0.0, 0.0, 0.0]])
    assert p.W.nnz == 2 and r.W.nnz == 4
    assert p.bias.tolist() == r.bias.tolist() and p.fusion_weight == 0.7


def test_choose_pruning_keeps_the_small_weight_that_ranks_the_right_label_first():
    # Two dev points; ELIAS ranks the wrong label first for both. Only label 0's small weight on feature 0 (and
    # label 1's on feature 1) lets the ranker put the right label first: pruning at 0.1 loses them.
    W = sp.csr_matrix(np.array([[0.08, 0.0], [0.0, 0.08]], dtype=np.float32))
    ranker = SparseRanker(W, np.array([0.5, 0.5], dtype=np.float32))
    X_dev = sp.csr_matrix(np.eye(2, dtype=np.float32))
    y_dev = sp.csr_matrix(np.eye(2, dtype=np.float32))
    ids = np.array([[1, 0], [0, 1]])
    scores = np.array([[0.6, 0.4], [0.6, 0.4]], dtype=np.float32)
    counts = np.array([5, 5])
    thr, w, by = choose_pruning(ranker, [0.05, 0.1], X_dev, ids, scores, y_dev, counts, 10, metric="P@1")
    assert thr == 0.05 and by[0.05][w] == 100.0
    assert max(by[0.1].values()) == 0.0  # pruned at 0.1 it cannot fix either point


def test_choose_pruning_prefers_the_smaller_ranker_on_a_tie():
    ranker = SparseRanker(sp.csr_matrix(np.array([[0.5, 0.0], [0.0, 0.5]], dtype=np.float32)),
                          np.zeros(2, dtype=np.float32))
    eye = sp.csr_matrix(np.eye(2, dtype=np.float32))
    thr, _, _ = choose_pruning(ranker, [0.05, 0.1], eye, np.array([[1, 0], [0, 1]]),
                               np.array([[0.6, 0.4], [0.6, 0.4]], dtype=np.float32), eye, np.array([5, 5]), 10, "P@1")
    assert thr == 0.1


def test_config_takes_the_single_threshold_of_older_model_directories_and_rejects_bad_lists():
    cfg = EliasConfig.from_dict({"train": {"reranker_threshold": 0.2}})
    assert cfg.train.reranker_thresholds == [0.2]
    assert EliasConfig().with_overrides(["train.reranker_thresholds=[0.01,0.1]"]).train.reranker_thresholds == [0.01,
                                                                                                               0.1]
    for bad in ("[]", "[-0.1]", "[\"x\"]", "0.1"):
        with pytest.raises(ConfigError, match="reranker_thresholds"):
            EliasConfig().with_overrides([f"train.reranker_thresholds={bad}"])


def test_config_refuses_a_reranker_depth_below_the_answer():
    assert EliasConfig().with_overrides(["train.reranker_depth=300"]).train.reranker_depth == 300
    assert EliasConfig().train.reranker_depth == 0  # chosen on dev
    with pytest.raises(ConfigError, match="reranker_depth must be 0 .chosen on dev. or at least 100"):
        EliasConfig().with_overrides(["train.reranker_depth=50"])


def test_config_takes_a_deep_keep_rate_in_zero_to_one():
    assert EliasConfig().with_overrides(["train.reranker_deep_keep=1"]).train.reranker_deep_keep == 1.0
    assert EliasConfig().train.reranker_deep_keep == 0.0  # the budget by the depth
    for bad in ("1.5", "-0.2"):
        with pytest.raises(ConfigError, match="reranker_deep_keep must be in"):
            EliasConfig().with_overrides([f"train.reranker_deep_keep={bad}"])
    assert EliasConfig().with_overrides(["train.reranker_deep_from=50"]).train.reranker_deep_from == 50
    with pytest.raises(ConfigError, match="reranker_deep_from must be at least 1"):
        EliasConfig().with_overrides(["train.reranker_deep_from=0"])


def test_config_takes_a_positive_stopping_tolerance():
    assert EliasConfig().train.reranker_tol == 0.3
    assert EliasConfig().with_overrides(["train.reranker_tol=0.1"]).train.reranker_tol == 0.1
    for bad in ("0", "-0.1"):
        with pytest.raises(ConfigError, match="reranker_tol must be above 0"):
            EliasConfig().with_overrides([f"train.reranker_tol={bad}"])


def test_the_deep_negatives_budget_holds_at_any_depth_down_to_a_quarter():
    from trainer.reranker import deep_keep_rate

    assert deep_keep_rate(0.3, 300, 50) == 0.3  # a configured rate is kept
    for depth in (100, 150):
        rate = deep_keep_rate(0.0, depth, 50)
        assert rate * (depth - 50) == pytest.approx(25)  # 25 deep negatives per point, in expectation
    assert deep_keep_rate(0.0, 100, 50) == 0.5
    assert deep_keep_rate(0.0, 300, 50) == deep_keep_rate(0.0, 1000, 50) == 0.25  # loss weights at most 4
    assert deep_keep_rate(0.0, 60, 50) == 1.0  # a window that small keeps every one


def _dev_lists(n: int, positive_ranks: list[int], depth: int = 300) -> tuple[np.ndarray, sp.csr_matrix]:
    """n dev points ranked over labels 0..depth-1 in order; point i's positive is the label at positive_ranks[i]."""
    ids = np.tile(np.arange(depth), (n, 1))
    y = sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), positive_ranks)), shape=(n, 1000))
    return ids, y


def test_choose_depth_goes_deep_only_when_the_top_100_misses_enough_positives():
    ids, y = _dev_lists(20, [3] * 19 + [150])  # 1 of 20 found positives below rank 100: 5%, not more
    assert choose_depth(ids, y, 1000) == (100, 0.05)
    ids, y = _dev_lists(20, [3] * 18 + [150, 299])  # 10%
    assert choose_depth(ids, y, 1000) == (300, 0.1)
    ids, y = _dev_lists(20, [3] * 18 + [150, 299])
    assert choose_depth(ids, y, 200)[0] == 200  # never deeper than the label set
    assert choose_depth(ids, y, 50)[0] == 100
    ids, y = _dev_lists(2, [999, 999])  # nothing found at all: the shallow window
    assert choose_depth(ids, y, 1000) == (100, 0.0)


def test_margins_are_each_candidates_dot_product_plus_bias():
    rng = np.random.default_rng(0)
    X = sp.random(7, 60, density=0.2, format="csr", random_state=1, dtype=np.float32)
    W = sp.random(40, 60, density=0.3, format="csr", random_state=2, dtype=np.float32)
    ranker = SparseRanker(W, rng.normal(size=40).astype(np.float32))
    ids = rng.integers(0, 40, size=(7, 12))
    ids[0, 5:] = -1  # padding
    ids[1, :3] = 4  # the same label twice in a list
    m = ranker.margins(X, ids)
    dense = X.toarray() @ W.toarray().T + ranker.bias
    expect = np.where(ids >= 0, np.take_along_axis(dense, np.maximum(ids, 0), 1), -np.inf)
    np.testing.assert_allclose(m, expect, rtol=1e-5, atol=1e-6)
    assert m.dtype == np.float32
    with pytest.raises(ValueError, match="7 feature rows for 2 candidate lists"):
        ranker.margins(X, ids[:2])
    with pytest.raises(ValueError, match="past the ranker's 40 labels"):
        ranker.margins(X, np.full((7, 2), 40))


def test_margins_of_a_large_batch_split_over_threads_match_one_thread(monkeypatch):
    import torch

    rng = np.random.default_rng(3)
    X = sp.random(700, 80, density=0.1, format="csr", random_state=4, dtype=np.float32)
    W = sp.random(50, 80, density=0.5, format="csr", random_state=5, dtype=np.float32)
    ranker = SparseRanker(W, np.zeros(50, dtype=np.float32))
    ids = rng.integers(-1, 50, size=(700, 20))
    dense = X.toarray() @ W.toarray().T
    expect = np.where(ids >= 0, np.take_along_axis(dense, np.maximum(ids, 0), 1), -np.inf)
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        np.testing.assert_allclose(ranker.margins(X, ids), expect, rtol=1e-5, atol=1e-6)
