"""The ELIAS++ ranker's pruning, and choosing its pruning threshold and fusion weight on dev."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from elias_retrieval.config import ConfigError, EliasConfig
from elias_retrieval.reranker import SparseRanker
from trainer.reranker import choose_pruning


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
    with pytest.raises(ConfigError, match="reranker_depth must be at least 100"):
        EliasConfig().with_overrides(["train.reranker_depth=50"])
