import numpy as np
import pytest
import scipy.sparse as sp

from elias_retrieval.metrics import evaluate, inverse_propensity


def Y(rows: list[list[int]], ncols: int) -> sp.csr_matrix:
    data = [(i, j) for i, r in enumerate(rows) for j in r]
    r, c = zip(*data, strict=True) if data else ((), ())
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), ncols))


def test_precision_recall_and_ndcg_by_hand():
    # point 0: true {1, 2}, ranked [1, 0, 2, 3, 4] -> hits at ranks 1 and 3
    # point 1: true {4}, ranked [0, 4, -1, -1, -1] -> hit at rank 2
    pred = np.array([[1, 0, 2, 3, 4], [0, 4, -1, -1, -1]])
    m = evaluate(pred, Y([[1, 2], [4]], 5), np.ones(5), 10)
    assert m["P@1"] == pytest.approx(100 * (1 + 0) / 2)
    assert m["P@3"] == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    assert m["P@5"] == pytest.approx(100 * (2 / 5 + 1 / 5) / 2)
    assert m["R@10"] == pytest.approx(100.0)  # both points find all their labels
    d = 1 / np.log2(np.arange(2, 7))
    ndcg3_p0 = (d[0] + d[2]) / (d[0] + d[1])
    ndcg3_p1 = d[1] / d[0]
    assert m["nDCG@3"] == pytest.approx(100 * (ndcg3_p0 + ndcg3_p1) / 2)
    assert m["nDCG@1"] == pytest.approx(100 * (1 + 0) / 2)


def test_point_without_labels_counts_zero_for_precision_and_is_left_out_of_recall():
    pred = np.array([[0, 1], [0, 1]])
    m = evaluate(pred, Y([[0], []], 3), np.ones(3), 10)
    assert m["P@1"] == pytest.approx(50.0)
    assert m["R@10"] == pytest.approx(100.0)
    assert m["num_points_without_labels"] == 1


def test_label_unseen_in_training_counts_against_recall():
    # Vocabulary has 3 labels; column 3 is a test-only label that no model can predict.
    pred = np.array([[0, 1, 2]])
    m = evaluate(pred, Y([[0, 3]], 4), np.array([5, 5, 5]), 10)
    assert m["R@10"] == pytest.approx(50.0)
    assert m["R@100 [0]"] == pytest.approx(0.0)
    assert m["R@100 [3-5]"] == pytest.approx(100.0)


def test_psp_is_normalised_by_the_best_ranking():
    counts = np.array([100, 1, 10])
    ip = inverse_propensity(counts, 1000)
    assert ip[1] > ip[2] > ip[0] > 1  # rarer labels weigh more
    pred = np.array([[0, 2, 1]])  # true {0, 1}
    m = evaluate(pred, Y([[0, 1]], 3), counts, 1000)
    assert m["PSP@1"] == pytest.approx(100 * ip[0] / ip[1])  # best first pick would be the rare label 1
    assert m["PSP@3"] == pytest.approx(100 * (ip[0] + ip[1]) / (ip[1] + ip[0]))


def test_inverse_propensity_formula():
    n, a, b = 1000, 0.55, 1.5
    expected = 1 + (np.log(n) - 1) * (b + 1) ** a * (7 + b) ** (-a)
    assert inverse_propensity(np.array([7]), n)[0] == pytest.approx(expected)


def test_padding_never_counts_as_a_hit():
    pred = np.full((1, 5), -1)
    m = evaluate(pred, Y([[0]], 2), np.ones(2), 10)
    assert m["P@1"] == 0 and m["R@100"] == 0
