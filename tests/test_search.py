import pytest
import torch

from elias_retrieval.search import (
    _FREE,
    SearchTensors,
    _best_paths_dense,
    _best_paths_scratch,
    _best_paths_sorted,
    _scratch,
    best_paths,
    blocks_pay,
    edge_weights,
    search,
)


def random_tensors(L: int = 300, C: int = 16, kappa: int = 40, d: int = 8, seed: int = 0) -> SearchTensors:
    g = torch.Generator().manual_seed(seed)
    A_ids = torch.stack([torch.randperm(L + 1, generator=g)[:kappa] for _ in range(C)])  # may include pad L
    A_logits = torch.randn(C, kappa, generator=g)
    return SearchTensors(
        W_C=torch.randn(C, d, generator=g),
        b_C=torch.randn(C, generator=g),
        A_ids=A_ids,
        A_weights=edge_weights(A_logits, A_ids, L, beta=3.0),
        W_L=torch.randn(L, d, generator=g),
        b_L=torch.randn(L, generator=g),
        alpha=3.0,
    )


def exhaustive_scores(emb: torch.Tensor, t: SearchTensors) -> torch.Tensor:
    """The ELIAS score of every label: best path over all clusters times the label classifier."""
    L = t.num_labels
    s = torch.clamp(t.alpha * torch.softmax(emb @ t.W_C.T + t.b_C, -1), max=1)  # (B, C)
    dense_a = torch.zeros(t.num_clusters, L + 1)
    dense_a.scatter_reduce_(1, t.A_ids, t.A_weights, reduce="amax")
    path = (s.unsqueeze(-1) * dense_a[:, :L].unsqueeze(0)).amax(1)  # (B, L)
    reached = (dense_a[:, :L] > 0).any(0)
    final = path * torch.sigmoid(emb @ t.W_L.T + t.b_L)
    return torch.where(reached, final, torch.full_like(final, -1.0))


def test_full_beam_and_shortlist_equal_exhaustive_scoring():
    t = random_tensors()
    emb = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    res = search(emb, t, k=20, beam_size=t.num_clusters, shortlist_size=t.num_labels)
    exp_scores, exp_ids = torch.topk(exhaustive_scores(emb, t), 20, dim=1)
    assert torch.equal(res.ids, exp_ids)
    torch.testing.assert_close(res.scores, exp_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.scores, res.path * res.label_prob, atol=1e-6, rtol=0)


def best_paths_by(route: str, ids: torch.Tensor, path: torch.Tensor, k: int, L: int) -> tuple[torch.Tensor, ...]:
    """One of best_paths' routes, called directly (best_paths picks one by L, N and the device)."""
    score = path.masked_fill(ids == L, -1.0)
    k = min(k, ids.shape[1])
    if route == "dense":
        return _best_paths_dense(ids, score, min(k, L), L)
    if route == "scratch":  # prefilters the top 2 candidates, widens, then scatters all of them
        return _best_paths_scratch(ids, score, k, 2, L)
    if route == "scratch-all":  # no prefilter: every candidate through the scratch buffer at once
        return _best_paths_scratch(ids, score, k, ids.shape[1], L)
    return _best_paths_sorted(ids, score, k, 2)


ROUTES = ["dense", "scratch", "scratch-all", "sorted"]


@pytest.mark.parametrize("route", ROUTES)
def test_best_paths_keeps_each_label_once_with_its_best_path(route):
    ids = torch.tensor([[3, 5, 3, 7, 5, 9]])
    path = torch.tensor([[0.2, 0.9, 0.8, 0.1, 0.3, 0.5]])
    pos, valid = best_paths_by(route, ids, path, 10, 9)
    got = sorted(((int(ids[0, p]), round(float(path[0, p]), 4)) for p, v in zip(pos[0], valid[0], strict=True) if v),
                 key=lambda x: -x[1])
    assert got == [(5, 0.9), (3, 0.8), (7, 0.1)]  # 9 is the pad id
    assert int(valid.sum()) == 3


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("L", [30, 5000])
def test_best_paths_matches_a_brute_force_max_per_label_with_ties_and_pads(route, L):
    g = torch.Generator().manual_seed(L)
    B, N, k = 7, 200, 25
    ids = torch.randint(0, L + 1, (B, N), generator=g)  # L = pad
    ids[3, :150] = torch.arange(10).repeat(15)  # a row crowded by duplicates: must widen
    ids[5] = L  # a row of pads only
    path = torch.randint(0, 20, (B, N), generator=g).float() / 20  # many exact ties
    pos, valid = best_paths_by(route, ids, path, k, L)  # the routes start from 2 candidates and must widen
    pos32, valid32 = best_paths(ids.int(), path, k, L)  # an index read from disk has int32 A_ids
    assert valid32.sum() == valid.sum()
    for r in range(B):
        best: dict[int, float] = {}
        for i, p in zip(ids[r].tolist(), path[r].tolist(), strict=True):
            if i != L:
                best[i] = max(best.get(i, -1.0), p)
        want = sorted(best.values(), reverse=True)[:k]
        got_ids = ids[r, pos[r][valid[r]]].tolist()
        got = sorted(path[r, pos[r][valid[r]]].tolist(), reverse=True)
        assert len(set(got_ids)) == len(got_ids) == len(want)
        assert got == want
        assert all(best[i] == path[r, p] for i, p in zip(got_ids, pos[r][valid[r]].tolist(), strict=True))


def partition_tensors(W_L_dtype: torch.dtype, L: int = 600, C: int = 16, d: int = 8) -> SearchTensors:
    """A stage-1 graph: each label in one cluster, a = 1, the last cluster short (pad slots); W_L stored as
    fp32, fp16 or int8 with per-row scales, as an index keeps it."""
    g = torch.Generator().manual_seed(3)
    kappa = -(-L // C) + 2
    A_ids = torch.full((C, kappa), L)
    for c, members in enumerate(torch.randperm(L, generator=g).tensor_split(C)):
        A_ids[c, : len(members)] = members
    W_L, scale = torch.randn(L, d, generator=g), None
    if W_L_dtype == torch.int8:
        scale = W_L.abs().amax(1) / 127
        W_L = torch.round(W_L / scale.unsqueeze(1)).to(torch.int8)
    return SearchTensors(W_C=torch.randn(C, d, generator=g), b_C=torch.randn(C, generator=g), A_ids=A_ids,
                         A_weights=(A_ids != L).float(), W_L=W_L.to(W_L_dtype), b_L=torch.randn(L, generator=g),
                         alpha=3.0, W_L_scale=scale, partition=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_a_batch_scored_by_cluster_blocks_equals_each_query_scored_by_row_gathers(dtype):
    t = partition_tensors(dtype)
    emb = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    beam = 4
    assert blocks_pay(emb, torch.zeros(64, beam, dtype=torch.long), t)  # the batch takes the block route
    assert not blocks_pay(emb[:1], torch.zeros(1, beam, dtype=torch.long), t)  # a lone query gathers rows
    batch = search(emb, t, k=30, beam_size=beam, shortlist_size=100, parts=1)
    assert (batch.ids >= 0).all()
    for i in range(len(emb)):
        one = search(emb[i : i + 1], t, k=30, beam_size=beam, shortlist_size=100)
        assert torch.equal(batch.ids[i], one.ids[0])
        for field in ("scores", "path", "label_prob", "cluster"):
            torch.testing.assert_close(getattr(batch, field)[i], getattr(one, field)[0], atol=1e-5, rtol=0)


def test_the_block_route_is_for_partitions_only():
    t = random_tensors()  # overlapping rows of A: a label can sit in several beam clusters
    assert not blocks_pay(torch.randn(64, 8), torch.zeros(64, 4, dtype=torch.long), t)


def test_unreachable_slots_are_padded_with_minus_one():
    t = random_tensors(L=50, C=4, kappa=3)
    res = search(torch.randn(2, 8), t, k=30, beam_size=1, shortlist_size=30)
    assert (res.ids[:, 3:] == -1).all()
    assert (res.scores[:, 3:] == 0).all()


@pytest.mark.parametrize("L", [300, 40_000])  # dense dedupe, then the large-L route
def test_int32_graph_ids_as_read_from_disk_give_the_same_results(L):
    t = random_tensors(L=L, C=16, kappa=40)
    t32 = SearchTensors(t.W_C, t.b_C, t.A_ids.int(), t.A_weights, t.W_L, t.b_L, t.alpha)
    emb = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    a, b = search(emb, t, k=50, beam_size=4, shortlist_size=100), search(emb, t32, k=50, beam_size=4,
                                                                          shortlist_size=100)
    assert (a.ids >= 0).sum() == 5 * 50
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("L", [300, 40_000])  # the dense and the scratch dedupe
def test_a_batch_split_across_threads_equals_one_query_at_a_time(L):
    # One query at a time never splits; 48 queries go to the row pool in three parts.
    t = random_tensors(L=L, kappa=min(40, L))
    emb = torch.randn(48, 8, generator=torch.Generator().manual_seed(7))
    batch = search(emb, t, k=10, beam_size=4, shortlist_size=50, parts=3)
    for i in range(len(emb)):
        one = search(emb[i : i + 1], t, k=10, beam_size=4, shortlist_size=50)
        for field in ("ids", "scores", "path", "label_prob", "cluster"):
            torch.testing.assert_close(getattr(batch, field)[i], getattr(one, field)[0], atol=1e-6, rtol=0)


def _split_search_in_child(t: SearchTensors, emb: torch.Tensor, out) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP threads are not fork-safe; this is about the row pool
    out.put(search(emb, t, k=5, beam_size=4, shortlist_size=50, parts=2).ids.tolist())


def test_a_forked_child_searches_split_batches_on_its_own_pool():
    import multiprocessing as mp

    t, emb = random_tensors(), torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    want = search(emb, t, k=5, beam_size=4, shortlist_size=50, parts=2).ids  # the parent's pool now exists
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_split_search_in_child, args=(t, emb, out))
    child.start()
    try:
        got = out.get(timeout=60)  # without a fresh pool the child waits forever on threads it does not have
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert got == want.tolist()


def test_the_scratch_route_never_keeps_a_pad_slot_and_hands_its_buffer_back_clean():
    # The paths are not masked and the pad slots (id L) carry each row's best paths (a real pad slot's path is
    # 0), so only the pad marker in the scratch buffer keeps them out. The pooled buffer then serves a smaller
    # L whose pad slot was a label slot of the first call.
    for L in (100, 50):
        ids = torch.tensor([[3, L, 7, 3, L, 9], [L, L, 1, 2, 2, L]])
        path = torch.tensor([[0.2, 0.99, 0.5, 0.4, 0.98, 0.1], [0.9, 0.8, 0.3, 0.1, 0.6, 0.7]])
        pos, valid = _best_paths_scratch(ids, path, 4, 6, L)
        got = [sorted(int(ids[r, p]) for p, v in zip(pos[r], valid[r], strict=True) if v) for r in range(2)]
        assert got == [[3, 7, 9], [1, 2]]
        assert [float(path[1, p]) for p, v in zip(pos[1], valid[1], strict=True) if v and ids[1, p] == 2] == [
            pytest.approx(0.6)]
        buf = _scratch.acquire(L + 1)
        assert bool((buf == _FREE).all())
        _scratch.release(buf)
