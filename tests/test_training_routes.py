"""The fast training routes equal their plain reference: the batch's label logits (distinct-label GEMM) against
gathering each shortlisted row, stage 1's shortlist (a top-k over a partition) against the deduplicating
step 4, RowAdam without a coalesce against RowAdam with one, and the precision chosen from the hardware."""

from __future__ import annotations

import pytest
import torch

import elias_retrieval.search as search_mod
from elias_retrieval.malloc import release_freed_memory, reuse_freed_memory
from elias_retrieval.precision import PrecisionError, has_fast_bf16, matmul_dtype
from elias_retrieval.search import batch_label_logits, cluster_scores, shortlist
from trainer.optim import RowAdam


def _reference_logits(emb, ids, W_L, b_L):
    return (W_L[ids] * emb.unsqueeze(1)).sum(-1) + b_L[ids]  # each shortlisted row gathered: (B, K, d)


@pytest.mark.parametrize("distinct_labels", [20, 200], ids=["few labels: subset GEMM", "most labels: dense GEMM"])
def test_batch_label_logits_and_gradients_equal_gathering_each_row(distinct_labels):
    g = torch.Generator().manual_seed(0)
    L, d, B, K = 200, 8, 6, 30
    ids = torch.randint(0, distinct_labels, (B, K), generator=g)
    emb = torch.randn(B, d, generator=g)
    grads = []
    for fn in (_reference_logits, batch_label_logits):
        W = torch.randn(L, d, generator=torch.Generator().manual_seed(1)).requires_grad_()
        b = torch.randn(L, generator=torch.Generator().manual_seed(2)).requires_grad_()
        e = emb.clone().requires_grad_()
        z = fn(e, ids, W, b)
        (z * torch.arange(K)).sum().backward()  # a different weight per column: a wrong column shows
        grads.append((z.detach(), e.grad, W.grad, b.grad))
    for ref, fast in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)  # summation order differs


def test_bf16_label_logits_stay_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    emb, W, b = torch.randn(4, 64, generator=g), torch.randn(500, 64, generator=g) / 8, torch.randn(500, generator=g)
    ids = torch.randint(0, 500, (4, 50), generator=g)
    z32 = batch_label_logits(emb, ids, W, b)
    z16 = batch_label_logits(emb, ids, W, b, torch.bfloat16)
    assert z16.dtype == torch.float32
    assert (z16 - z32).abs().max() < 0.05 * z32.abs().max()
    assert not torch.equal(z16, z32)  # the product did run in bf16


def _partition_setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L, C, per, B = 60, 10, 6, 5
    perm = torch.randperm(L, generator=g)
    A_ids = torch.full((C, per + 2), L)  # two pad slots per row
    A_ids[:, :per] = perm.view(C, per)
    A_w = (A_ids != L).float()
    s = cluster_scores(torch.randn(B, C, generator=g), 3.0)
    forced = torch.zeros(B, C, dtype=torch.bool)
    forced[torch.arange(B), torch.randint(0, C, (B,), generator=g)] = True
    return s, A_ids, A_w, L, forced


@pytest.mark.parametrize("k", [7, 100], ids=["shortlist cut", "every candidate kept"])
def test_stage1_partition_shortlist_equals_the_deduplicating_route(k):
    s, A_ids, A_w, L, forced = _partition_setup()
    ids, path, cluster, valid = shortlist(s, A_ids, A_w, 3, k, L, forced, partition=True)
    ref_ids, ref_path, _, ref_valid = shortlist(s, A_ids, A_w, 3, k, L, forced)
    home = torch.full((L + 1,), -1)
    home[A_ids.flatten()] = torch.arange(A_ids.shape[0]).repeat_interleave(A_ids.shape[1])
    for r in range(ids.shape[0]):
        got = ids[r][valid[r]]
        assert len(set(got.tolist())) == len(got) and not (got == L).any()  # distinct labels, never a pad slot
        assert torch.equal(cluster[r][valid[r]], home[got])
        torch.testing.assert_close(path[r][valid[r]], s[r, home[got]])  # path = the home cluster's score
        # The same path scores as the reference (labels of one cluster tie: either route may cut among them).
        torch.testing.assert_close(path[r][valid[r]].sort().values, ref_path[r][ref_valid[r]].sort().values)
    if k == 100:
        assert all(set(ids[r][valid[r]].tolist()) == set(ref_ids[r][ref_valid[r]].tolist()) for r in range(len(ids)))


def test_row_adam_skips_the_coalesce_only_for_distinct_sorted_rows(monkeypatch):
    def run(indices: list[int]) -> tuple[torch.Tensor, int]:
        calls = {"n": 0}
        real = torch.Tensor.coalesce

        def counting(self):
            calls["n"] += 1
            return real(self)

        monkeypatch.setattr(torch.Tensor, "coalesce", counting)
        emb = torch.nn.Embedding(10, 4, sparse=True)
        torch.nn.init.constant_(emb.weight, 1.0)
        opt = RowAdam(emb.parameters(), lr=0.1)
        idx = torch.tensor(indices)
        (emb(idx) * torch.arange(1.0, len(indices) + 1).unsqueeze(1)).sum().backward()
        opt.step()
        monkeypatch.setattr(torch.Tensor, "coalesce", real)
        return emb.weight.detach().clone(), calls["n"]

    w_sorted, n_sorted = run([1, 3, 7])
    w_repeat, n_repeat = run([3, 1, 3])  # row 3 twice: its gradients must be summed
    assert n_sorted == 0 and n_repeat == 1
    assert torch.equal(w_sorted[[0, 2, 4, 5, 6, 8, 9]], torch.ones(7, 4))  # rows without gradient untouched
    assert (w_sorted[[1, 3, 7]] < 1).all()
    # The summed gradient of row 3 (weights 1 + 3) moves it like a single gradient would: one Adam step of lr.
    torch.testing.assert_close(w_repeat[3], torch.full((4,), 0.9))


def test_precision_follows_the_setting_and_the_hardware():
    cpu = torch.device("cpu")
    assert matmul_dtype("fp32", cpu) == torch.float32
    assert matmul_dtype("bf16", cpu) == torch.bfloat16
    assert matmul_dtype("auto", cpu) == (torch.bfloat16 if has_fast_bf16(cpu) else torch.float32)
    with pytest.raises(PrecisionError, match="train.precision must be one of auto, fp32, bf16"):
        matmul_dtype("fp16", cpu)


def test_auto_precision_reads_the_cpu_flags(monkeypatch):
    import elias_retrieval.precision as precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert matmul_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert matmul_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_reuse_freed_memory_on_glibc():
    import platform

    assert reuse_freed_memory() is (platform.libc_ver()[0] == "glibc")
    x = torch.ones(64 << 18)  # a 64 MB block, served from the heap now; still a working tensor
    assert float(x.sum()) == 64 << 18
    del x
    assert release_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_the_dense_fraction_switches_routes(monkeypatch):
    calls = []
    real = torch.Tensor.index_select

    def spy(self, dim, index):
        calls.append(index.numel())
        return real(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    W, b = torch.randn(100, 4), torch.randn(100)
    emb = torch.randn(2, 4)
    batch_label_logits(emb, torch.arange(95).view(1, 95).expand(2, 95), W, b)  # 95% of the labels: dense
    batch_label_logits(emb, torch.arange(10).view(2, 5), W, b)  # 10%: the distinct rows only
    assert calls[0] == 2 * 95 and calls[1:] == [10, 10]  # b_L's lookups; then W_L's 10 distinct rows
    assert search_mod._DISTINCT_DENSE_FRACTION == 0.9


@pytest.mark.parametrize("popular", [False, True], ids=["spread beams", "one cluster in every beam"])
def test_cluster_block_logits_and_gradients_equal_gathering_each_row(popular):
    """Stage 1's block route: each beam cluster's slots scored by bucketed small products (padding rows, unused
    clusters and pad slots included) gives the reference's logits and gradients, in expand's candidate order."""
    from elias_retrieval.cluster_blocks import cluster_block_logits
    from elias_retrieval.search import expand

    g = torch.Generator().manual_seed(3)
    L, C, kappa, d, B, beam = 70, 12, 7, 16, 40, 3  # 12 * 7 = 84 slots: 14 pads
    A_ids = torch.full((C * kappa,), L)
    A_ids[torch.randperm(C * kappa, generator=g)[:L]] = torch.arange(L)
    A_ids = A_ids.view(C, kappa)
    score = torch.rand(B, C, generator=g)
    if popular:
        score[:, 5] = 2.0  # cluster 5 is in all 40 beams: a bucket of 64 rows
    score[:, 11] = -1.0  # cluster 11 in none
    clusters = torch.topk(score, beam, dim=1).indices
    cand_ids, _ = expand(clusters, torch.ones(B, beam), A_ids, torch.ones(C, kappa))
    valid = cand_ids != L
    weight = torch.randn(B, beam * kappa, generator=g) * valid
    grads = []
    for route in ("reference", "blocks"):
        W = torch.randn(L, d, generator=torch.Generator().manual_seed(1)).requires_grad_()
        e = torch.randn(B, d, generator=torch.Generator().manual_seed(2)).requires_grad_()
        if route == "reference":
            z = (W[torch.where(valid, cand_ids, 0)] * e.unsqueeze(1)).sum(-1)
        else:
            z = cluster_block_logits(e, clusters, A_ids, W, torch.float32)
        (z * weight).sum().backward()
        grads.append((z.detach() * valid, e.grad, W.grad))
    for ref, fast in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_stage1_loss_takes_the_block_route_and_equals_the_dense_one(monkeypatch):
    import elias_retrieval.model as model_mod
    from elias_retrieval.config import ModelConfig
    from elias_retrieval.encoders import Encoder
    from elias_retrieval.model import EliasModel

    class Rows(Encoder):  # a batch's embeddings handed in as they are
        kind, dim = "rows", 8

        def forward(self, batch):
            return batch["emb"]

    torch.manual_seed(0)
    L, C = 256, 32
    model = EliasModel(Rows(), L, C, 20, ModelConfig(dim=8, beam_size=2, shortlist_size=40))
    model.set_partition(  # stage 1: 32 clusters of 8 labels; 3 of them per beam, 9% of the dense product
        [list(range(c * 8, c * 8 + 8)) for c in range(C)])
    with torch.no_grad():
        model.W_L.normal_()
        model.W_C.normal_()
    batch = {"emb": torch.randn(6, 8)}
    pos_rows, pos_labels = torch.tensor([0, 1, 5]), torch.tensor([3, 100, 250])
    routes = []
    real = model_mod.cluster_block_logits

    def spy(*args):
        routes.append("blocks")
        return real(*args)

    monkeypatch.setattr(model_mod, "cluster_block_logits", spy)
    loss_blocks, _ = model.loss(batch, pos_rows, pos_labels, 0.0)
    monkeypatch.setattr(model_mod, "block_route_pays", lambda *a: False)
    loss_dense, _ = model.loss(batch, pos_rows, pos_labels, 0.0)
    assert routes == ["blocks"]
    torch.testing.assert_close(loss_blocks, loss_dense)


def test_membership_by_binary_search_equals_isin():
    from elias_retrieval.model import _member

    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 500, (7, 40), generator=g)
    for n in (0, 1, 30):
        sorted_keys = torch.sort(torch.randint(0, 500, (n,), generator=g)).values
        assert torch.equal(_member(keys, sorted_keys), torch.isin(keys, sorted_keys))
    assert _member(torch.tensor([[499, 500]]), torch.tensor([3, 499])).tolist() == [[True, False]]  # past the end


def test_the_positives_table_and_the_key_search_mark_the_same_pairs(monkeypatch):
    from elias_retrieval import model as model_module

    g = torch.Generator().manual_seed(1)
    B, K, L = 6, 30, 50
    ids = torch.randint(0, L + 1, (B, K), generator=g)  # L: the pad id, never a positive
    pos_rows = torch.randint(0, B, (20,), generator=g)
    pos_labels = torch.where(torch.rand(20, generator=g) < 0.5, ids[pos_rows, torch.randint(0, K, (20,),
                                                                                            generator=g)],
                             torch.randint(0, L, (20,), generator=g))
    want = torch.tensor([[(r, int(ids[r, j])) in set(zip(pos_rows.tolist(), pos_labels.tolist(), strict=True))
                          for j in range(K)] for r in range(B)])
    assert want.any()
    table = model_module.positive_mask(ids, pos_rows, pos_labels, L)
    monkeypatch.setattr(model_module, "_DENSE_POSITIVES_ELEMENTS", B * (L + 1) - 1)  # too big for the table
    search = model_module.positive_mask(ids, pos_rows, pos_labels, L)
    assert torch.equal(table, want) and torch.equal(search, want)


def test_row_adam_compiled_update_equals_the_tensor_update(monkeypatch):
    from trainer import optim

    def run() -> tuple[torch.Tensor, ...]:
        emb = torch.nn.Embedding(50, 16, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)))
        opt = RowAdam(emb.parameters(), lr=0.05)
        for seed in range(5):
            rows = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(seed)).unique()
            opt.zero_grad()
            (emb(rows) ** 2).sum().backward()  # distinct sorted rows, as the tf-idf encoder looks them up
            opt.step()
        st = opt.state[emb.weight]
        return emb.weight.detach().clone(), st["exp_avg"], st["exp_avg_sq"]

    calls = {"n": 0}
    compiled = optim._fused_rows

    def counted(*args):
        calls["n"] += 1
        return compiled(*args)

    monkeypatch.setattr(optim, "_fused_rows", counted)
    fused = run()
    assert calls["n"] == 5  # the CPU float32 table took the compiled route
    monkeypatch.setattr(optim, "_fused", lambda p, st: False)
    tensors = run()
    assert calls["n"] == 5
    for a, b in zip(fused, tensors, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (fused[1] != 0).any()  # the rows moved
