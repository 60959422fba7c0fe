"""elias_retrieval.synthetic: the structure the benchmarks and other tests rely on."""

from __future__ import annotations

import torch

from elias_retrieval.search import search
from elias_retrieval.synthetic import cluster_of_labels, default_num_clusters, synthetic_queries, synthetic_tensors


def test_shapes_dtypes_and_defaults():
    t = synthetic_tensors(10_000, dim=48, kappa=300)
    assert t.num_clusters == default_num_clusters(10_000) == 128
    assert t.A_ids.shape == (128, 300) and t.A_ids.dtype == torch.int64
    assert t.W_L.shape == (10_000, 48) and t.W_L.dtype == torch.float16
    assert float(t.A_weights.min()) >= 0 and float(t.A_weights.max()) == 1
    assert synthetic_tensors(50, dim=8, kappa=1000, dtype="fp32").A_ids.shape == (2, 50)  # kappa <= L


def test_each_row_holds_its_members_first_then_neighbours():
    t = synthetic_tensors(5_000, dim=16, kappa=200, seed=2)
    cluster = cluster_of_labels(5_000, t.num_clusters, seed=2)
    for c in (0, 7, t.num_clusters - 1):
        members = torch.nonzero(cluster == c).squeeze(1)
        row = t.A_ids[c]
        assert set(row[: len(members)].tolist()) == set(members.tolist())
        assert (t.A_weights[c, : len(members)] == 1).all() and (t.A_weights[c, len(members):] < 1).all()
        assert cluster[row[len(members)]] == (c + 1) % t.num_clusters
    covered = torch.zeros(5_000, dtype=torch.bool)
    covered[t.A_ids.flatten()] = True
    assert covered.all()


def test_queries_find_their_label_first():
    t = synthetic_tensors(20_000, dim=64, kappa=400, seed=5)
    q, labels = synthetic_queries(t, 100, seed=6)
    assert q.shape == (100, 64) and q.dtype == torch.float32
    res = search(q, t, k=10, beam_size=8, shortlist_size=200)
    assert (res.ids[:, 0] == labels).float().mean() >= 0.98


def test_same_seed_same_tensors():
    a, b = synthetic_tensors(3_000, dim=16, kappa=100, seed=9), synthetic_tensors(3_000, dim=16, kappa=100, seed=9)
    assert torch.equal(a.W_L, b.W_L) and torch.equal(a.A_ids, b.A_ids) and torch.equal(a.W_C, b.W_C)


def test_a_written_synthetic_index_opens_and_finds_its_queries(tmp_path):
    from elias_retrieval.searcher import Searcher
    from elias_retrieval.synthetic import write_synthetic_index

    out = write_synthetic_index(tmp_path / "ix", 4_000, dim=32, kappa=200, seed=3,
                                defaults={"k": 10, "beam_size": 8, "shortlist_size": 300})
    s = Searcher.open(out, device="cpu")
    assert (s.info.num_labels, s.info.dim, s.info.query_kinds) == (4_000, 32, ["embedding"])
    assert s.defaults == {"k": 10, "beam_size": 8, "shortlist_size": 300}
    q, labels = synthetic_queries(synthetic_tensors(4_000, dim=32, kappa=200, seed=3), 50, seed=1)
    res = s.search_embeddings(q.numpy())
    assert (res.ids[:, 0] == labels.numpy()).mean() >= 0.95  # dense ids = label ids "0" .. "L-1"
    assert res.label_ids[0][0] == str(res.ids[0, 0])
