"""EliasModel: where the loss's gradients go, stage-1 and stage-2 edge weights, and label parents."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from elias_retrieval.config import FeatureConfig, ModelConfig
from elias_retrieval.data import Dataset, LabelVocab
from elias_retrieval.encoders import TfidfEncoder
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.model import EliasModel

N, F, L, C, D = 48, 60, 64, 16, 16  # 16 clusters of 4 labels: alpha * softmax stays below 1, W_C gets gradients


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    X = sp.random(N, F, density=0.2, format="csr", random_state=seed, dtype=np.float32)
    X.data[:] = rng.integers(1, 4, X.nnz)
    Y = rng.random((N, L)) < 0.05
    Y[np.arange(N), rng.integers(0, L, N)] = True  # every point has a label
    return Dataset(None, X, sp.csr_matrix(Y.astype(np.float32)), LabelVocab([str(i) for i in range(L)]))


def _model(beta: float = 150.0, beam: int = 4, shortlist: int = 20, seed: int = 0) -> tuple[EliasModel, Dataset]:
    torch.manual_seed(seed)
    data = _data(seed)
    enc = TfidfEncoder(TfidfFeaturizer.fit(data, FeatureConfig()), D)
    cfg = ModelConfig(dim=D, beta=beta, beam_size=beam, shortlist_size=shortlist, embed_dropout=0.0)
    model = EliasModel(enc, L, C, 8, cfg)
    model.set_partition([list(range(4 * c, 4 * c + 4)) for c in range(C)])
    return model, data


def _batch(model: EliasModel, data: Dataset, rows: np.ndarray):
    batch = model.encoder.prepare(data).batch(rows, torch.device("cpu"))
    yb = data.labels[rows].tocoo()
    return batch, torch.from_numpy(yb.row.astype(np.int64)), torch.from_numpy(yb.col.astype(np.int64))


def _random_graph(kappa: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-2 style graph: every label in 1-3 clusters, random logits, pad id L with logit -inf."""
    g = np.random.default_rng(seed)
    rows: list[list[int]] = [[] for _ in range(C)]
    for lab in range(L):
        for c in g.choice(C, size=g.integers(1, 4), replace=False):
            rows[c].append(lab)
    width = max(kappa, max(map(len, rows)))
    ids = torch.full((C, width), L, dtype=torch.long)
    logits = torch.full((C, width), float("-inf"))
    for c, members in enumerate(rows):
        ids[c, : len(members)] = torch.tensor(members)
        logits[c, : len(members)] = torch.from_numpy(g.normal(size=len(members)).astype(np.float32))
    return ids, logits


def _nonzero_grad(p: torch.Tensor) -> bool:
    g = p.grad
    assert g is not None
    g = g.coalesce().values() if g.is_sparse else g
    return bool(torch.isfinite(g).all()) and bool((g != 0).any())


def test_stage1_loss_gradients_reach_the_encoder_cluster_and_label_classifiers_but_not_A():
    model, data = _model()
    model.train()
    batch, pr, pl = _batch(model, data, np.arange(16))
    loss, stats = model.loss(batch, pr, pl, lam=0.05)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name in ("W_C", "b_C", "W_L", "b_L"):
        assert _nonzero_grad(getattr(model, name)), name
    enc = model.encoder
    for name, p in (("proj", enc.proj.weight), ("bias", enc.bias), ("hidden", enc.hidden.weight)):
        assert _nonzero_grad(p), name
    assert model.A_logits.grad is None  # stage 1: A is the fixed partition


def test_stage2_loss_gradients_reach_A_logits_on_edges_only():
    model, data = _model(beta=2.0)  # beta * softmax below 1: no slot is clamped
    ids, logits = _random_graph()
    model.set_graph(ids, logits, stage=2)
    model.train()
    batch, pr, pl = _batch(model, data, np.arange(24))
    loss, _ = model.loss(batch, pr, pl, lam=0.05)
    loss.backward()
    g = model.A_logits.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g[ids < L] != 0).any()
    assert (g[ids == L] == 0).all()
    for name in ("W_C", "W_L"):
        assert _nonzero_grad(getattr(model, name)), name
    assert _nonzero_grad(model.encoder.proj.weight)


def test_stage2_path_term_alone_reaches_A_and_W_C():
    model, data = _model(beta=2.0)
    ids, logits = _random_graph(seed=1)
    model.set_graph(ids, logits, stage=2)
    batch, pr, pl = _batch(model, data, np.arange(24))
    _, stats = model.loss(batch, pr, pl, lam=0.0)
    with_path, _ = model.loss(batch, pr, pl, lam=1.0)
    without, _ = model.loss(batch, pr, pl, lam=0.0)
    (with_path - without).backward()
    assert stats["path_loss"] > 0
    assert _nonzero_grad(model.A_logits) and _nonzero_grad(model.W_C)
    assert model.W_L.grad is None or (model.W_L.grad == 0).all()  # the path term does not involve W_L


def test_teacher_forcing_puts_every_positive_in_the_training_shortlist():
    model, data = _model(beam=1, shortlist=L)
    batch, pr, pl = _batch(model, data, np.arange(N))
    _, stats = model.loss(batch, pr, pl, lam=0.0)
    assert stats["recall"] == 1.0


def test_stage1_edge_weights_are_one_on_members_and_zero_on_pads():
    model, _ = _model()
    sizes = [1, 7, 4, 2, 6, 4, 4, 4, 3, 5, 4, 4, 4, 4, 4, 4]  # uneven clusters, 64 labels in all
    perm = np.random.default_rng(3).permutation(L)
    clusters = np.split(perm, np.cumsum(sizes)[:-1])
    model.set_partition([list(c) for c in clusters])
    assert int(model.stage) == 1
    w = model.edge_weights()
    members = model.A_ids != L
    assert w.shape == model.A_ids.shape == (C, max(sizes))
    assert torch.equal(w, members.float())
    assert int(members.sum()) == L
    for c, labels in enumerate(clusters):
        assert set(model.A_ids[c][members[c]].tolist()) == set(labels.tolist())
        assert (model.label_parent[torch.as_tensor(labels)] == c).all()
    assert torch.equal(model.search_tensors().A_weights, members.float())


def test_update_parents_picks_each_labels_best_cluster():
    model, _ = _model(beta=1.0)  # no clamping: no ties between a label's clusters
    ids, logits = _random_graph(seed=2)
    model.set_graph(ids, logits, stage=2)
    w = model.edge_weights()
    dense = torch.zeros(C, L + 1)
    dense.scatter_(1, ids, w)
    expected = dense[:, :L].argmax(0)
    assert torch.equal(model.label_parent, expected)
    # Parents follow A's logits: make every label's last cluster its strongest, recompute once.
    with torch.no_grad():
        for lab in range(L):
            c_last = int(torch.nonzero((ids == lab).any(1)).max())
            model.A_logits[c_last][ids[c_last] == lab] = 10.0
    model.update_parents()
    for lab in range(L):
        assert int(model.label_parent[lab]) == int(torch.nonzero((ids == lab).any(1)).max())


def test_stage2_edge_weights_are_normalised_and_zero_on_pads():
    model, _ = _model()
    ids, logits = _random_graph(seed=4)
    model.set_graph(ids, logits, stage=2)
    w = model.edge_weights()
    assert (w[ids == L] == 0).all()
    assert ((w[ids < L] > 0) & (w[ids < L] <= 1)).all()
    expected = torch.clamp(150.0 * torch.softmax(logits, 1), max=1.0).masked_fill(ids == L, 0.0)
    torch.testing.assert_close(w, expected)
