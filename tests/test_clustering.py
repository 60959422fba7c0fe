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


def test_joint_features_weigh_the_embedding_and_pifa_halves_alike():
    from trainer.clustering import joint_features

    rng = np.random.default_rng(0)
    phi = rng.normal(size=(5, 4)).astype(np.float32) * np.array([[1], [3], [0.5], [10], [0]], dtype=np.float32)
    dense = rng.random((5, 7)).astype(np.float32) * (rng.random((5, 7)) < 0.5)
    dense[:, 0] += 0.1  # every label has a PIFA row
    Z = sp.csr_matrix(dense / np.linalg.norm(dense, axis=1, keepdims=True))
    joint = joint_features(phi, Z.copy())
    J = np.hstack([joint.dense, joint.sparse.toarray()])
    assert J.shape == (5, 11)
    for i in range(4):  # a label with both halves: unit rows, each half of norm 1/sqrt(2), directions kept
        np.testing.assert_allclose(np.linalg.norm(J[i, :4]), 2 ** -0.5, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(J[i, 4:]), 2 ** -0.5, rtol=1e-5)
        np.testing.assert_allclose(J[i, :4] * 2 ** 0.5, phi[i] / np.linalg.norm(phi[i]), rtol=1e-5)
    np.testing.assert_allclose(J[4, :4], 0.0)  # no embedding centroid: the PIFA half alone, unit length
    np.testing.assert_allclose(J[4, 4:], Z[4].toarray().ravel(), rtol=1e-5)


def test_config_checks_the_recluster_fraction_and_reads_the_older_epoch_key():
    import pytest

    from elias_retrieval.config import ConfigError, EliasConfig

    assert EliasConfig().with_overrides(["train.recluster_fraction=0.25"]).train.recluster_fraction == 0.25
    for bad in ("-0.1", "1", "1.5"):
        with pytest.raises(ConfigError, match=r"recluster_fraction must be in \[0, 1\)"):
            EliasConfig().with_overrides([f"train.recluster_fraction={bad}"])
    # A model directory written before the fraction: its "never" is read as a fraction of 0 ...
    assert EliasConfig.from_dict({"train": {"recluster_epoch": 0}}).train.recluster_fraction == 0.0
    # ... and an epoch number is refused with the key that replaced it.
    with pytest.raises(ConfigError, match="replaced by train.recluster_fraction"):
        EliasConfig().with_overrides(["train.recluster_epoch=2"])


def test_the_recluster_epoch_is_a_fraction_of_stage_1_with_an_epoch_left_after_it():
    from trainer.train import recluster_epoch

    assert [recluster_epoch(0.5, e) for e in (2, 3, 4, 6, 17, 50)] == [1, 2, 2, 3, 9, 25]
    assert recluster_epoch(0.5, 1) == 0  # no epoch would be left after it
    assert recluster_epoch(0.0, 10) == 0  # off
    assert recluster_epoch(0.99, 4) == 3 and recluster_epoch(0.01, 4) == 1  # never the last, never before the first
