import numpy as np
import scipy.sparse as sp
import torch

from trainer.graph_init import cluster_affinity, coverage, init_graph


def test_affinity_sums_cluster_scores_over_each_labels_positives():
    ids = np.array([[0, 1], [1, 2]])
    scores = np.array([[0.9, 0.1], [0.6, 0.4]], dtype=np.float32)
    Y = sp.csr_matrix(np.array([[1, 0], [1, 1]], dtype=np.float32))  # label 0: both points; label 1: point 1
    aff = cluster_affinity(ids, scores, Y, C=3).toarray()
    np.testing.assert_allclose(aff, [[0.9, 0.7, 0.4], [0.0, 0.6, 0.4]], atol=1e-6)


def test_every_label_keeps_an_edge_even_when_rows_are_full():
    L, C, kappa = 40, 4, 10
    rng = np.random.default_rng(0)
    # All affinity mass sits in cluster 0 so its row overflows; labels 30-39 have no affinity at all.
    dense = np.zeros((L, C))
    dense[:30, 0] = rng.random(30) + 0.5
    partition = [np.arange(c * 10, (c + 1) * 10) for c in range(C)]
    assert len(partition) == C
    A_ids, A_logits = init_graph(sp.csr_matrix(dense), partition, kappa)
    assert coverage(A_ids, L).all()
    assert A_ids.shape[1] >= kappa
    assert torch.isinf(A_logits[A_ids == L]).all() and torch.isfinite(A_logits[A_ids < L]).all()


def test_rows_keep_their_strongest_labels():
    L, kappa = 6, 4
    dense = np.array([[5, 0], [4, 0], [3, 1], [2, 0], [1, 6], [0, 7]], dtype=np.float64)
    partition = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    A_ids, A_logits = init_graph(sp.csr_matrix(dense), partition, kappa)
    row0 = set(A_ids[0][A_ids[0] < L].tolist())
    assert {0, 1, 2, 3} == row0  # label 3's best (only) cluster is 0
    assert set(A_ids[1][A_ids[1] < L].tolist()) >= {4, 5, 2}
    top0 = int(A_ids[0][A_logits[0].argmax()])
    assert top0 == 0
