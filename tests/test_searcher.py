"""Searcher: exact search through the library object, request checking, encoders, dynamic batching."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from elias_retrieval.batching import DeadlineExpired, DynamicBatcher
from elias_retrieval.search import SearchTensors, best_paths, edge_weights, pack_cluster_weights, search
from elias_retrieval.searcher import LabelStrings, Query, QueryError, Searcher, SearchParams, resident_copy

L, C, KAPPA, D, NUM_FEATURES = 300, 16, 40, 8, 64


def random_tensors(L: int = L, C: int = C, kappa: int = KAPPA, d: int = D, seed: int = 0) -> SearchTensors:
    g = torch.Generator().manual_seed(seed)
    A_ids = torch.stack([torch.randperm(L + 1, generator=g)[:kappa] for _ in range(C)])  # may include pad L
    A_logits = torch.randn(C, kappa, generator=g)
    return SearchTensors(
        W_C=torch.randn(C, d, generator=g), b_C=torch.randn(C, generator=g), A_ids=A_ids,
        A_weights=edge_weights(A_logits, A_ids, L, beta=3.0), W_L=torch.randn(L, d, generator=g),
        b_L=torch.randn(L, generator=g), alpha=3.0,
    )


def exhaustive_scores(emb: torch.Tensor, t: SearchTensors) -> torch.Tensor:
    """The ELIAS score of every label (best path over all clusters times its classifier); -1 if unreachable."""
    n = t.num_labels
    s = torch.clamp(t.alpha * torch.softmax(emb @ t.W_C.T + t.b_C, -1), max=1)
    dense_a = torch.zeros(t.num_clusters, n + 1).scatter_reduce_(1, t.A_ids, t.A_weights, reduce="amax")
    path = (s.unsqueeze(-1) * dense_a[:, :n].unsqueeze(0)).amax(1)
    final = path * torch.sigmoid(emb @ t.W_L.T + t.b_L)
    return torch.where((dense_a[:, :n] > 0).any(0), final, torch.full_like(final, -1.0))


class FakeTfidfEncoder(nn.Module):
    """The tf-idf encoder's contract (featurizer.num_features, sparse batch dict, encode(texts)), hashed words."""

    kind = "tfidf"

    def __init__(self, num_features: int = NUM_FEATURES, dim: int = D):
        super().__init__()
        self.featurizer = SimpleNamespace(num_features=num_features)
        self.dim = dim
        self.proj = nn.Embedding(num_features, dim)
        nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(3))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.proj(batch["features"])
        X = torch.sparse_csr_tensor(batch["crow"], batch["col"], batch["values"],
                                    size=(batch["crow"].shape[0] - 1, rows.shape[0]), check_invariants=False)
        return X @ rows

    def featurize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array(sorted({sum(map(ord, w)) % self.featurizer.num_features for w in text.lower().split()}))
        return ids, np.full(len(ids), 1.0 / np.sqrt(max(1, len(ids))), dtype=np.float32)

    def encode(self, texts: list[str], batch_size: int = 1024) -> torch.Tensor:
        return torch.stack([self.embed_sparse(*self.featurize(t)) for t in texts])

    def embed_sparse(self, ids: np.ndarray, values: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(values).unsqueeze(1) * self.proj.weight[torch.from_numpy(ids)]).sum(0)


class Labels:
    def __init__(self, n: int):
        self.ids = [f"L{i}" for i in range(n)]
        self.names = [f"label {i}" if i % 7 else None for i in range(n)]


def make_searcher(tensors: SearchTensors | None = None, **kwargs) -> Searcher:
    info = {"index_version": "test-v1", "defaults": {"k": 10, "beam_size": 4, "shortlist_size": 50}}
    return Searcher(tensors or random_tensors(), FakeTfidfEncoder(), Labels(L), info, device="cpu", **kwargs)


def test_full_beam_and_shortlist_equal_exhaustive_scoring():
    s = make_searcher()
    emb = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    res = s.search_embeddings(emb.numpy(), k=20, beam_size=C, shortlist_size=L)
    exp_scores, exp_ids = torch.topk(exhaustive_scores(emb, random_tensors()), 20, dim=1)
    np.testing.assert_array_equal(res.ids, exp_ids.numpy())
    np.testing.assert_allclose(res.scores, exp_scores.numpy(), atol=1e-5, rtol=0)
    assert res.label_ids[0][0] == f"L{exp_ids[0, 0]}"


def fp16_cluster_weights(t: SearchTensors) -> SearchTensors:
    """`t` with W_C stored in fp16 (as a compact index stores it)."""
    return SearchTensors(t.W_C.half(), t.b_C, t.A_ids, t.A_weights, t.W_L, t.b_L, t.alpha)


@pytest.mark.parametrize("packed", [True, False])
def test_fp16_cluster_weights_search_exactly_as_their_fp32_values(packed: bool):
    # A stored fp16 W_C is multiplied in fp32 (fbgemm's packed product, or a widened copy): the result is the
    # exhaustive ELIAS score over the fp16 values, to fp32 rounding.
    h = fp16_cluster_weights(random_tensors())
    if packed:
        h.W_C_packed = pack_cluster_weights(h.W_C, h.b_C, min_elements=0)
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            assert h.W_C_packed is None
            return
        assert h.W_C_packed is not None
    emb = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    res = search(emb, h, k=20, beam_size=C, shortlist_size=L)
    widened = SearchTensors(h.W_C.float(), h.b_C, h.A_ids, h.A_weights, h.W_L, h.b_L, h.alpha)
    exp_scores, exp_ids = torch.topk(exhaustive_scores(emb, widened), 20, dim=1)
    np.testing.assert_array_equal(res.ids.numpy(), exp_ids.numpy())
    np.testing.assert_allclose(res.scores.numpy(), exp_scores.numpy(), atol=1e-5, rtol=0)


def test_packed_cluster_weights_hold_no_reference_to_the_given_tensors():
    # A packed bias that aliased b_C would keep a memory-mapped index (and every page search touched) resident.
    W_C, b_C = torch.randn(64, 8).half(), torch.randn(64)
    ref = weakref.ref(b_C)
    packed = pack_cluster_weights(W_C, b_C, min_elements=0)
    del b_C
    gc.collect()
    assert ref() is None
    if packed is not None:  # still usable without it
        torch.testing.assert_close(torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), packed).shape,
                                   torch.Size([1, 64]))


def test_searcher_packs_a_large_fp16_cluster_matrix_only():
    big = SearchTensors(torch.randn(4096, 128).half(), torch.zeros(4096), torch.zeros(4096, 2, dtype=torch.long),
                        torch.ones(4096, 2), torch.randn(4, 128), torch.zeros(4), 1.0)
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    assert (Searcher(big, None, None, device="cpu").tensors.W_C_packed is not None) == fbgemm
    small = make_searcher(fp16_cluster_weights(random_tensors())).tensors  # fp32 in cache beats fbgemm
    assert small.W_C_packed is None and small.W_C.dtype == torch.float32
    assert make_searcher().tensors.W_C_packed is None  # an fp32 W_C is searched as stored


def test_best_paths_stays_exact_when_duplicates_crowd_the_first_candidates():
    # 20 clusters all holding labels 0..9 first (with the best paths), then distinct labels: the top
    # k + margin candidates hold only 10 distinct labels, so the search must widen to stay exact.
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.arange(10).repeat(20), 10 + torch.randperm(500, generator=g)]).unsqueeze(0)
    path = torch.cat([1 + torch.rand(200, generator=g), torch.rand(500, generator=g)]).unsqueeze(0)
    pos, valid = best_paths(ids, path, k=100, pad_id=10_000)
    got = ids[0, pos[0]]
    best = torch.full((510,), -1.0).scatter_reduce(0, ids[0], path[0], reduce="amax")
    assert valid.all() and len(set(got.tolist())) == 100
    torch.testing.assert_close(path[0, pos[0]].sort(descending=True).values, torch.topk(best, 100).values)


def test_compact_label_weights_give_nearly_the_same_ranking():
    t = random_tensors()
    scale = t.W_L.abs().amax(1) / 127
    q8 = SearchTensors(t.W_C, t.b_C, t.A_ids, t.A_weights, torch.round(t.W_L / scale[:, None]).to(torch.int8),
                       t.b_L, t.alpha, W_L_scale=scale)
    h16 = SearchTensors(t.W_C, t.b_C, t.A_ids, t.A_weights, t.W_L.half(), t.b_L, t.alpha)
    emb = np.random.default_rng(0).normal(size=(4, D)).astype(np.float32)
    ref = make_searcher(t).search_embeddings(emb, k=5, beam_size=C, shortlist_size=L)
    for compact in (q8, h16):
        res = make_searcher(compact).search_embeddings(emb, k=5, beam_size=C, shortlist_size=L)
        np.testing.assert_allclose(res.scores, ref.scores, atol=0.02)


def test_explain_gives_the_cluster_and_both_score_factors():
    s = make_searcher()
    res = s.search_embeddings(np.ones((1, D), np.float32), k=5, explain=True)
    np.testing.assert_allclose(res.scores, res.path * res.label_prob, atol=1e-6)
    A_ids = random_tensors().A_ids
    for j in range(5):
        assert int(res.ids[0, j]) in A_ids[int(res.cluster[0, j])].tolist()
    assert s.search_embeddings(np.ones((1, D), np.float32), k=5).cluster is None


def test_text_and_sparse_queries_are_encoded_like_their_embeddings():
    s = make_searcher()
    enc = s.encoder
    text = "wine market regulation"
    ids, vals = enc.featurize(text)
    with torch.no_grad():
        emb = enc.embed_sparse(ids, vals).numpy()
    by_emb = s.search_embeddings(emb[None], k=10)
    by_text = s.search_texts([text], k=10)
    by_sparse = s.search_sparse([(ids, vals)], k=10)
    for res in (by_text, by_sparse):
        np.testing.assert_array_equal(res.ids, by_emb.ids)
        np.testing.assert_allclose(res.scores, by_emb.scores, atol=1e-5)
    mixed = s.search([Query(text=text), Query(embedding=emb), Query(sparse=(ids, vals))], s.resolve_params(k=10))
    np.testing.assert_array_equal(mixed.ids, np.repeat(by_emb.ids, 3, axis=0))


def test_label_names_come_from_the_vocabulary():
    res = make_searcher().search_embeddings(np.ones((2, D), np.float32), k=10)
    for row in range(2):
        for j, lid in enumerate(res.label_ids[row]):
            i = int(res.ids[row, j])
            assert lid == f"L{i}" and res.label_names[row][j] == ("" if i % 7 == 0 else f"label {i}")


@pytest.mark.parametrize(("query", "field"), [
    (Query(), "query"),
    (Query(text="a", embedding=np.zeros(D)), "query"),
    (Query(text="   "), "query.text"),
    (Query(embedding=np.zeros(D + 1)), "query.embedding"),
    (Query(embedding=np.full(D, np.nan)), "query.embedding"),
    (Query(embedding=np.full(D, np.inf)), "query.embedding"),
    (Query(sparse=(np.array([1, NUM_FEATURES]), np.ones(2))), "query.sparse.indices"),
    (Query(sparse=(np.array([-1]), np.ones(1))), "query.sparse.indices"),
    (Query(sparse=(np.array([], dtype=np.int64), np.ones(0))), "query.sparse.indices"),
    (Query(sparse=(np.array([1, 2]), np.ones(3))), "query.sparse.values"),
    (Query(sparse=(np.array([1]), np.array([np.nan]))), "query.sparse.values"),
])
def test_bad_queries_raise_query_error_naming_the_field(query: Query, field: str):
    with pytest.raises(QueryError) as e:
        make_searcher().check_query(query)
    assert e.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"k": 0}, "params.k"), ({"k": 1001}, "params.k"), ({"beam_size": C + 1}, "params.beam_size"),
    ({"beam_size": 0}, "params.beam_size"), ({"shortlist_size": 0}, "params.shortlist_size"),
    ({"shortlist_size": L + 1}, "params.shortlist_size"),
])
def test_bad_parameters_raise_query_error_naming_the_field(kwargs: dict, field: str):
    with pytest.raises(QueryError) as e:
        make_searcher(max_k=1000).resolve_params(**kwargs)
    assert e.value.field == field


def test_defaults_come_from_the_index_info():
    s = make_searcher()
    assert s.resolve_params() == SearchParams(k=10, beam_size=4, shortlist_size=50)
    assert s.info.query_kinds == ["embedding", "text", "sparse"] and s.info.num_features == NUM_FEATURES


def test_resident_copy_keeps_values_and_layout():
    x = torch.randn(64, 5)
    for t in (x, x.T, x.half()):
        y = resident_copy(t)
        assert torch.equal(y, t) and y.stride() == t.stride() and y.data_ptr() != t.data_ptr()


def test_dynamic_batcher_answers_each_caller_with_its_own_k():
    s = make_searcher()
    b = DynamicBatcher(s, max_batch=8, max_wait_us=20_000)
    rng = np.random.default_rng(0)
    embs = rng.normal(size=(16, D)).astype(np.float32)
    try:
        for _ in range(16):
            b.arrive()  # announced: the worker waits for the others
        with ThreadPoolExecutor(16) as pool:
            futs = [pool.submit(lambda i: b.submit(Query(embedding=embs[i]), s.resolve_params(k=1 + i % 5),
                                                   announced=True).result(5), i) for i in range(16)]
            results = [f.result() for f in futs]
        ref = s.search_embeddings(embs, k=5)
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r.ids[0], ref.ids[i, : 1 + i % 5])
        assert b.queries == 16 and b.batches < 16
    finally:
        b.close()


def test_dynamic_batcher_skips_queries_whose_deadline_passed():
    s = make_searcher()
    gate = threading.Event()
    original = s.search_checked

    def slow(queries, params):
        gate.wait(5)
        return original(queries, params)

    s.search_checked = slow  # type: ignore[method-assign]
    b = DynamicBatcher(s, max_batch=1, max_wait_us=0)
    try:
        first = b.submit(Query(embedding=np.ones(D, np.float32)), s.resolve_params())
        late = b.submit(Query(embedding=np.ones(D, np.float32)), s.resolve_params(), deadline=time.monotonic() + 0.05)
        time.sleep(0.1)
        gate.set()
        assert first.result(5).ids.shape == (1, 10)
        with pytest.raises(DeadlineExpired):
            late.result(5)
        assert b.expired == 1
    finally:
        b.close()


def test_without_a_vocabulary_labels_are_named_by_their_dense_id_and_a_cut_keeps_its_strings():
    s = make_searcher()
    s.labels = LabelStrings()  # as a Searcher built with labels=None
    res = s.search_embeddings(np.ones((2, D), np.float32), k=10)
    valid = [[int(i) for i in row if i >= 0] for row in res.ids]
    assert res.label_ids == [[str(i) for i in row] for row in valid]
    assert res.label_names == [[""] * len(row) for row in valid]
    cut = res.rows(1, 2, k=3)
    assert cut.ids.shape == (1, 3) and cut.label_ids == [[str(i) for i in valid[1][:3]]]
