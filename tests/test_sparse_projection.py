"""The tf-idf projection's one-pass sparse gradient against nn.Embedding's and a sparse product's."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from elias_retrieval.encoders import SparseInputs
from elias_retrieval.sparse_projection import distinct_features, fused_route_applies, project


def _batch():
    X = sp.random(9, 40, density=0.2, format="csr", random_state=0, dtype=np.float32)
    X = sp.csr_matrix(X.multiply(np.arange(9)[:, None] != 4))  # row 4: an empty document
    return X, SparseInputs(X).batch(np.array([0, 4, 2, 7, 8]), torch.device("cpu"))


def test_projection_and_its_sparse_gradient_equal_the_embedding_routes():
    X, batch = _batch()
    P = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))

    fast = P.clone().requires_grad_()
    out = project(fast, batch)
    (out * upstream).sum().backward()

    emb = torch.nn.Embedding(40, 6, sparse=True)
    emb.weight.data.copy_(P)
    rows = emb(batch["features"])
    Xb = torch.sparse_csr_tensor(batch["crow"], batch["col"], batch["values"], size=(5, rows.shape[0]),
                                 check_invariants=True)
    ref = Xb @ rows
    (ref * upstream).sum().backward()

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, torch.from_numpy(X[[0, 4, 2, 7, 8]] @ P.numpy()))
    g = fast.grad
    assert g.is_sparse
    assert torch.equal(g._indices()[0], batch["features"])  # the batch's features, sorted, each once
    torch.testing.assert_close(g.to_dense(), emb.weight.grad.to_dense())
    assert out[1].abs().sum() == 0  # the empty document


def test_the_encoder_trains_through_the_projection_and_serves_without_it():
    from elias_retrieval.encoders import TfidfEncoder

    class Featurizer:
        num_features = 40

    enc = TfidfEncoder(Featurizer(), 6)
    _, batch = _batch()
    assert fused_route_applies(enc.proj.weight, batch)
    h = enc(batch)
    h.sum().backward()
    assert enc.proj.weight.grad.is_sparse
    with torch.no_grad():
        torch.testing.assert_close(enc(batch), h.detach())  # the inference route: nn.Embedding and a product


def test_a_batchs_distinct_features_are_np_uniques_on_both_routes():
    rng = np.random.default_rng(0)
    for num_features, size in ((100_000, 40), (100_000, 20_000), (50, 400), (10, 0)):
        indices = rng.integers(0, num_features, size=size).astype(np.int32)
        features, local = distinct_features(indices, num_features)
        want, want_local = np.unique(indices, return_inverse=True)
        np.testing.assert_array_equal(features, want)
        np.testing.assert_array_equal(local, want_local.ravel())
        np.testing.assert_array_equal(features[local], indices)  # each entry points back at its own feature
