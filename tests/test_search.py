import torch

from elias_retrieval.search import SearchTensors, best_paths, edge_weights, search


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


def test_best_paths_keeps_each_label_once_with_its_best_path():
    ids = torch.tensor([[3, 5, 3, 7, 5, 9]])
    path = torch.tensor([[0.2, 0.9, 0.8, 0.1, 0.3, 0.5]])
    pos, valid = best_paths(ids, path, k=10, pad_id=9)
    got = [(int(ids[0, p]), round(float(path[0, p]), 4)) for p, v in zip(pos[0], valid[0], strict=True) if v]
    assert got == [(5, 0.9), (3, 0.8), (7, 0.1)]  # 9 is the pad id
    assert int(valid.sum()) == 3


def test_unreachable_slots_are_padded_with_minus_one():
    t = random_tensors(L=50, C=4, kappa=3)
    res = search(torch.randn(2, 8), t, k=30, beam_size=1, shortlist_size=30)
    assert (res.ids[:, 3:] == -1).all()
    assert (res.scores[:, 3:] == 0).all()
