import numpy as np
import scipy.sparse as sp

from trainer.clustering import balanced_clusters, pifa


def test_pifa_rows_are_normalised_sums_of_positive_points():
    X = sp.csr_matrix(np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]))
    Y = sp.csr_matrix(np.array([[1, 1], [0, 1]], dtype=np.float32))
    Z = pifa(X, Y).toarray()
    np.testing.assert_allclose(Z[0], [0.6, 0.8, 0.0], atol=1e-6)
    expected = np.array([0.6, 0.8, 1.0]) / np.linalg.norm([0.6, 0.8, 1.0])
    np.testing.assert_allclose(Z[1], expected, atol=1e-6)


def test_balanced_clusters_partition_labels_into_equal_halves():
    rng = np.random.default_rng(0)
    Z = sp.random(203, 50, density=0.2, random_state=1, format="csr")
    clusters = balanced_clusters(Z, 8, seed=0)
    sizes = sorted(len(c) for c in clusters)
    assert len(clusters) == 8 and sizes[-1] - sizes[0] <= 1
    allm = np.sort(np.concatenate(clusters))
    assert np.array_equal(allm, np.arange(203))
    del rng


def test_balanced_clusters_separate_two_obvious_groups():
    # Labels 0-9 live on features 0-4, labels 10-19 on features 5-9.
    rng = np.random.default_rng(0)
    dense = np.zeros((20, 10))
    dense[:10, :5] = rng.random((10, 5)) + 0.1
    dense[10:, 5:] = rng.random((10, 5)) + 0.1
    clusters = balanced_clusters(sp.csr_matrix(dense), 2, seed=3)
    assert {frozenset(c.tolist()) for c in clusters} == {frozenset(range(10)), frozenset(range(10, 20))}
