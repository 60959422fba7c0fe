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


def test_mixed_case_with_empty_point_unseen_label_and_padding():
    # Training vocabulary: labels 0..3 with counts [0, 2, 50, 200]; column 4 is unseen in training.
    # point 0: true {0, 2},  ranked [2, 3, 0, -1]   -> hits at ranks 1, 3
    # point 1: true {},      ranked [1, -1, -1, -1] -> no labels: 0 for P/nDCG, left out of R
    # point 2: true {1, 4},  ranked [3, 1, -1, -1]  -> hit at rank 2; label 4 can never be found
    pred = np.array([[2, 3, 0, -1], [1, -1, -1, -1], [3, 1, -1, -1]])
    m = evaluate(pred, Y([[0, 2], [], [1, 4]], 5), np.array([0, 2, 50, 200]), 1000)
    assert m["num_points"] == 3 and m["num_points_without_labels"] == 1
    assert m["P@1"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert m["P@3"] == pytest.approx(100 * (2 / 3 + 0 + 1 / 3) / 3)
    assert m["P@5"] == pytest.approx(100 * (2 / 5 + 0 + 1 / 5) / 3)
    # R@k averages over the 2 points with labels: point 0 finds 2/2, point 2 finds 1/2.
    for k in (10, 20, 50, 100):
        assert m[f"R@{k}"] == pytest.approx(100 * (1 + 0.5) / 2)
    # nDCG@3: point 0 dcg = d1 + d3, ideal over min(3, 2) = d1 + d2; point 2 dcg = d2, ideal = d1 + d2.
    d1, d2, d3 = 1.0, 1 / np.log2(3), 0.5
    assert m["nDCG@3"] == pytest.approx(100 * ((d1 + d3) / (d1 + d2) + 0 + d2 / (d1 + d2)) / 3)
    # Buckets by training count of the true label: 0 -> {label 0 (found), label 4 (missed)},
    # 1-2 -> {label 1 (found)}, 21-100 -> {label 2 (found)}; no pairs in 3-5, 6-20, >100.
    assert m["R@100 [0]"] == pytest.approx(50.0)
    assert m["R@100 [1-2]"] == pytest.approx(100.0)
    assert m["R@100 [21-100]"] == pytest.approx(100.0)
    assert "R@100 [3-5]" not in m and "R@100 [6-20]" not in m and "R@100 [>100]" not in m


def test_psp_sums_over_points_against_the_best_achievable_top_k():
    # counts [1, 100, 1000] -> ip0 > ip1 > ip2. point 0: true {0, 1}, ranked [1, 2, 0];
    # point 1: true {2}, ranked [2, 0, 1]. PSP@1 = (ip1 + ip2) / (ip0 + ip2); PSP@3 = (ip1 + ip0 + ip2) / same + ip1.
    counts = np.array([1, 100, 1000])
    ip = inverse_propensity(counts, 5000)
    pred = np.array([[1, 2, 0], [2, 0, 1]])
    m = evaluate(pred, Y([[0, 1], [2]], 3), counts, 5000)
    assert m["PSP@1"] == pytest.approx(100 * (ip[1] + ip[2]) / (ip[0] + ip[2]))
    assert m["PSP@3"] == pytest.approx(100.0)
    assert m["PSP@5"] == pytest.approx(100.0)


def test_fewer_than_100_columns_and_out_of_range_ids_are_handled():
    # ids past y_true's columns are never hits (and must not alias into the next row's keys).
    pred = np.array([[7, 0], [0, 1]])
    m = evaluate(pred, Y([[1], [0]], 3), np.ones(3), 10)
    assert m["P@1"] == pytest.approx(50.0)
    assert m["R@100"] == pytest.approx(50.0)  # 2 columns given: R@100 uses what is there


def test_vectorised_on_100k_points_is_fast():
    import time

    rng = np.random.default_rng(0)
    n, L = 100_000, 5000
    y = sp.csr_matrix((np.ones(5 * n), rng.integers(0, L, 5 * n), np.arange(0, 5 * n + 1, 5)), shape=(n, L))
    y.sum_duplicates()
    y.data[:] = 1
    pred = rng.integers(-1, L, size=(n, 100))
    t = time.perf_counter()
    m = evaluate(pred, y, rng.integers(0, 300, size=L), n)
    assert time.perf_counter() - t < 10.0
    assert m["num_points"] == n and 0 <= m["R@100"] <= 100


def test_format_table_has_one_row_per_metric():
    from elias_retrieval.metrics import format_table

    m = evaluate(np.array([[0]]), Y([[0]], 1), np.ones(1), 10)
    table = format_table(m)
    assert len(table.columns) == 2 and table.row_count == len(m)


def reference(pred, rows, counts, num_train):
    """Plain-loop definitions (ELIAS.md), to check the vectorised code on random cases."""
    ip = inverse_propensity(np.append(counts, np.zeros(100)), num_train)
    out = {}
    with_labels = [i for i, r in enumerate(rows) if r]
    for k in (1, 3, 5):
        out[f"P@{k}"] = 100 * np.mean([sum(p in r for p in pr[:k]) / k for pr, r in zip(pred, rows, strict=True)])
        nd = []
        for pr, r in zip(pred, rows, strict=True):
            dcg = sum(1 / np.log2(i + 2) for i, p in enumerate(pr[:k]) if p in r)
            idcg = sum(1 / np.log2(i + 2) for i in range(min(k, len(r))))
            nd.append(dcg / idcg if r else 0.0)
        out[f"nDCG@{k}"] = 100 * np.mean(nd)
        num = sum(ip[p] for pr, r in zip(pred, rows, strict=True) for p in pr[:k] if p in r)
        best = sum(sum(sorted((ip[j] for j in r), reverse=True)[:k]) for r in rows)
        out[f"PSP@{k}"] = 100 * num / best
    for k in (10, 20, 50, 100):
        out[f"R@{k}"] = 100 * np.mean([len(set(pred[i][:k]) & set(rows[i])) / len(rows[i]) for i in with_labels])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_plain_loop_reference_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n, L, extra = 30, 12, 3
    rows = [sorted(set(rng.integers(0, L + extra, rng.integers(0, 5)).tolist())) for _ in range(n)]
    pred = np.stack([rng.permutation(L)[:8] for _ in range(n)])
    pred[rng.random(pred.shape) < 0.2] = -1
    counts = rng.integers(0, 30, L)
    m = evaluate(pred, Y(rows, L + extra), counts, 500)
    for key, value in reference(pred.tolist(), rows, counts, 500).items():
        assert m[key] == pytest.approx(value), key
