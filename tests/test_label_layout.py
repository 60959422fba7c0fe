"""Labels stored in cluster order: the order itself, and that search answers exactly as in label-id order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from elias_retrieval.baseline import AnnBaseline
from elias_retrieval.data import LabelVocab
from elias_retrieval.index_format import write_index
from elias_retrieval.label_layout import (
    cluster_order,
    home_clusters,
    in_cluster_order,
    in_label_order,
    is_permutation,
    rows_of,
)
from elias_retrieval.search import SearchResult, SearchTensors, search
from elias_retrieval.searcher import Searcher
from elias_retrieval.synthetic import cluster_of_labels, synthetic_queries, synthetic_tensors

FIELDS = SearchResult.__dataclass_fields__


@pytest.fixture(scope="module")
def t() -> SearchTensors:
    return synthetic_tensors(4000, dim=32, kappa=300, num_clusters=64, seed=5, dtype="fp16")


def assert_same(a: SearchResult, b: SearchResult) -> None:
    # Scores to rounding: the GEMV over the gathered shortlist rows may sum a row in another order at
    # another position in the buffer.
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert torch.equal(x, y) if f in ("ids", "cluster") else torch.allclose(x, y, rtol=0, atol=1e-6), f


def test_home_cluster_is_the_row_with_the_largest_edge_weight_ties_to_the_lowest():
    L = 5  # pad id 5; label 4 is on no row
    A_ids = torch.tensor([[0, 1, 5], [1, 2, 0], [3, 2, 5]])
    A_w = torch.tensor([[0.2, 0.5, 0.0], [0.5, 0.9, 0.7], [0.1, 0.9, 0.0]])
    assert home_clusters(A_ids, A_w, L).tolist() == [1, 0, 1, 2, 3]
    order = cluster_order(A_ids, A_w, L)
    assert order.tolist() == [1, 0, 2, 3, 4]  # by home cluster, then by label id
    assert rows_of(order).tolist() == [1, 0, 2, 3, 4, 5]


def test_synthetic_rows_follow_the_clusters_the_generator_drew(t: SearchTensors):
    # Each synthetic label is a weight-1 member of its own cluster's row: that row is its home.
    home = home_clusters(t.A_ids, t.A_weights, t.num_labels)
    assert torch.equal(home, cluster_of_labels(t.num_labels, t.num_clusters, seed=5))


@pytest.mark.parametrize(("beam", "shortlist"), [(8, 400), (64, 4000), (2, 50)])
def test_search_in_cluster_order_answers_exactly_as_in_label_order(t: SearchTensors, beam: int, shortlist: int):
    laid = in_cluster_order(t)
    assert not torch.equal(laid.row_labels.long(), torch.arange(t.num_labels))
    q, _ = synthetic_queries(t, 40, seed=1)
    assert_same(search(q, t, 20, beam, shortlist), search(q, laid, 20, beam, shortlist))


def test_label_order_undoes_the_layout(t: SearchTensors):
    back = in_label_order(in_cluster_order(t))
    assert back.row_labels is None
    for name in ("A_ids", "A_weights", "W_L", "b_L", "W_C", "b_C"):
        assert torch.equal(getattr(back, name), getattr(t, name)), name
    assert in_label_order(t) is t


def test_the_layout_composes_and_queries_name_label_ids(t: SearchTensors):
    laid = in_cluster_order(t)
    again = in_cluster_order(dataclasses.replace(laid, W_L=laid.W_L.flip(0).contiguous(),
                                                 b_L=laid.b_L.flip(0).contiguous(),
                                                 row_labels=laid.row_labels.flip(0).contiguous(),
                                                 A_ids=(t.num_labels - 1 - laid.A_ids).where(
                                                     laid.A_ids < t.num_labels, laid.A_ids)))
    assert torch.equal(again.row_labels, laid.row_labels)  # the same order, however the rows came in
    q, truth = synthetic_queries(laid, 30, seed=2)  # truth: label ids, not rows
    assert (search(q, t, 1, 8, 400).ids[:, 0] == truth).float().mean() > 0.9  # t: row = label id
    assert (search(q, laid, 1, 8, 400).ids[:, 0] == truth).float().mean() > 0.9


def test_a_written_index_searches_and_baselines_in_label_ids(tmp_path: Path, t: SearchTensors):
    write_index(tmp_path / "idx", in_cluster_order(t), LabelVocab([str(i) for i in range(t.num_labels)], []),
                None, dtype="fp16", defaults={"k": 10, "beam_size": 8, "shortlist_size": 400}, meta={})
    s = Searcher.open(tmp_path / "idx", device="cpu")
    assert s.tensors.row_labels is not None
    q, _ = synthetic_queries(t, 25, seed=3)
    ref = search(q, t, 10, 8, 400)
    got = s.search_embeddings(q.numpy(), k=10, beam_size=8, shortlist_size=400, explain=True)
    assert (got.ids == ref.ids.numpy()).all() and abs(got.scores - ref.scores.numpy()).max() < 1e-6
    assert (got.cluster == ref.cluster.numpy()).all()
    flat_ref = AnnBaseline.from_searcher(t, "flat").search(q, 10)[0]
    assert (AnnBaseline.from_searcher(s, "flat").search(q, 10)[0] == flat_ref).all()


def test_is_permutation_checks_count_range_and_repeats():
    assert is_permutation(torch.tensor([2, 0, 1]), 3) and is_permutation(torch.tensor([], dtype=torch.long), 0)
    for bad in ([0, 1], [0, 1, 1], [-1, 1, 2], [0, 1, 3]):  # too short, a repeat, below and above the range
        assert not is_permutation(torch.tensor(bad), 3), bad
