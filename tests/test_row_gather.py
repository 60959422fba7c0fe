"""The compiled row gather of stage 1's cluster blocks against torch's cast, gather and gradient."""

from __future__ import annotations

import pytest
import torch

from elias_retrieval.row_gather import distinct, fused_route_applies, gather_rows


def _table(L: int, d: int) -> torch.Tensor:
    W = torch.randn(L, d, generator=torch.Generator().manual_seed(0))
    # bf16 rounding cases: exact ties (even and odd upper halves), values that carry into the exponent, inf, NaN
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F7FFFFF, 0x7F7FFFFF, 0x7F800000, 0x7FC00001, 0xFF800001,
                         0x00008000], dtype=torch.int64).to(torch.int32)
    W[0, : len(bits)] = bits.view(torch.float32)
    return W


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gathered_rows_and_gradient_equal_torchs(dtype):
    L, d = 50, 12
    W = _table(L, d)
    parts = [torch.tensor([7, 0, L, 3]), torch.tensor([L, 42, 8, 9, 11, L]), torch.tensor([49])]  # L: pad slots
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(len(p), d, generator=g).to(dtype) for p in parts]

    fast = W.clone().requires_grad_()
    outs = gather_rows(fast, parts, dtype)
    sum((o.float() * u.float()).sum() for o, u in zip(outs, upstream, strict=True)).backward()

    ref = W.clone().requires_grad_()
    cast = ref.to(dtype)
    ref_outs = [torch.where((p < L).unsqueeze(1), cast[p.clamp(max=L - 1)], torch.zeros((), dtype=dtype))
                for p in parts]
    sum((o.float() * u.float()).sum() for o, u in zip(ref_outs, upstream, strict=True)).backward()

    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for o, r in zip(outs, ref_outs, strict=True):
        assert o.dtype == dtype
        nan = r.isnan()
        assert torch.equal(o.isnan(), nan)  # torch's NaN bit pattern varies by instruction set; NaN stays NaN
        assert torch.equal(o.view(bits)[~nan], r.view(bits)[~nan])  # bit for bit, rounding ties and inf included
    assert torch.equal(fast.grad, ref.grad)
    assert fast.grad[[1, 2, 4, 5, 6, 10]].abs().sum() == 0  # rows no part names


def test_the_fused_route_needs_a_contiguous_float32_cpu_table_and_distinct_rows():
    W = torch.zeros(10, 4)
    assert fused_route_applies(W, torch.bfloat16) and fused_route_applies(W, torch.float32)
    assert not fused_route_applies(W, torch.float16)
    assert not fused_route_applies(W.half(), torch.bfloat16)
    assert not fused_route_applies(torch.zeros(4, 10).T, torch.float32)
    assert distinct(torch.tensor([3, 1, 10, 10, 0]), 10)  # 10 = pad, any number of times
    assert not distinct(torch.tensor([3, 1, 3]), 10)
    assert distinct(torch.tensor([], dtype=torch.long), 10)


def test_block_logits_with_a_label_twice_take_the_summing_route():
    """Outside a partition (a label in two clusters' rows), the gradient sums both slots' parts."""
    from elias_retrieval.cluster_blocks import cluster_block_logits

    L, d = 6, 4
    A_ids = torch.tensor([[0, 1, 2], [2, 3, 6], [4, 5, 6]])  # label 2 in clusters 0 and 1; 6 = pad
    clusters = torch.tensor([[0, 1], [1, 2]])
    emb = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    grads = []
    for twice in (True, False):
        W = torch.randn(L, d, generator=torch.Generator().manual_seed(1)).requires_grad_()
        ids = A_ids if twice else torch.tensor([[0, 1, 2], [6, 3, 6], [4, 5, 6]])
        z = cluster_block_logits(emb, clusters, ids, W, torch.float32)
        z.sum().backward()
        grads.append(W.grad[2])
    torch.testing.assert_close(grads[0], 2 * emb[0] + emb[1])  # row 0 has it in clusters 0 and 1, row 1 in 1
    torch.testing.assert_close(grads[1], emb[0])
