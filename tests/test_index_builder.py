"""`build_index` / `elias build-index` from a tiny model directory, pruning A, and `elias index info|verify`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from elias_retrieval import index_format as fmt
from elias_retrieval.cli import app
from elias_retrieval.cli import index as _register_index_verbs  # noqa: F401
from elias_retrieval.config import EliasConfig
from elias_retrieval.data import Dataset, LabelVocab
from elias_retrieval.encoders import TfidfEncoder
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.index_format import read_index
from elias_retrieval.label_layout import in_label_order
from elias_retrieval.model import EliasModel
from elias_retrieval.modeldir import load_model_dir, save_model_dir
from elias_retrieval.search import edge_weights, search
from index_builder.build import build_index
from index_builder.prune import prune_graph

TEXTS = [
    "regulation on the common organisation of the market in wine",
    "fishing quotas for cod in the north sea",
    "customs duties on imported steel products",
    "state aid to farmers for dairy production",
    "wine labelling and protected designations of origin",
    "fisheries agreement with morocco on sardines",
    "steel safeguard measures and tariff quotas",
    "milk quotas and dairy market support",
]
L, C, KAPPA, DIM = 40, 4, 16, 16


def tiny_model_dir(path: Path) -> Path:
    """A stage-2 model built without the trainer: tf-idf encoder, random W_C/W_L, a covering sparse A."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vocab = LabelVocab([f"eurovoc-{i}" for i in range(L)], [f"concept {i}" if i % 3 else None for i in range(L)])
    Y = sp.csr_matrix((rng.random((len(TEXTS), L)) < 0.1).astype(np.float32))
    data = Dataset(texts=TEXTS, features=None, labels=Y, vocab=vocab)
    cfg = EliasConfig()
    cfg.features.min_df, cfg.model.dim, cfg.model.beam_size, cfg.model.shortlist_size = 1, DIM, 3, 30
    featurizer = TfidfFeaturizer.fit(data, cfg.features)
    model = EliasModel(TfidfEncoder(featurizer, DIM), L, C, KAPPA, cfg.model)
    ids = torch.full((C, KAPPA), L, dtype=torch.long)
    for c in range(C):  # members c, c+4, ... (coverage), then a few other labels; the last slots padded
        own = torch.arange(c, L, C)
        others = torch.tensor([x for x in rng.permutation(L)[: KAPPA - len(own) - 2] if x % C != c])
        row = torch.cat([own, others])
        ids[c, : len(row)] = row
    model.set_graph(ids, torch.randn(C, KAPPA), stage=2)
    with torch.no_grad():
        model.b_L.normal_()
    counts = torch.from_numpy(np.asarray(Y.sum(0)).ravel().astype(np.int64))
    save_model_dir(path, model.eval(), cfg, vocab, featurizer, counts, meta={"num_train": len(TEXTS)})
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


def test_built_index_matches_the_model_on_raw_text(model_dir: Path, tmp_path: Path):
    out = build_index(model_dir, tmp_path / "idx", dtype="fp32", progress=False)
    fmt.verify_index(out)
    tm = load_model_dir(model_dir)
    ref = tm.model.search_tensors()
    ix = read_index(out)
    assert ix.manifest["label_order"] == "clusters"
    by_label = in_label_order(ix.tensors)  # the index stores label rows in cluster order
    for name in ("W_C", "b_C", "A_weights", "W_L", "b_L"):
        assert torch.equal(getattr(by_label, name), getattr(ref, name)), name
    assert torch.equal(by_label.A_ids.long(), ref.A_ids)
    assert ix.labels.ids == tm.vocab.ids and ix.labels.names == tm.vocab.names
    assert torch.equal(ix.train_label_counts, tm.train_label_counts.long())
    m = ix.manifest
    assert m["encoder"] == "tfidf" and m["num_train"] == len(TEXTS) and m["source"]["stage"] == 2
    assert ix.defaults == {"k": 100, "beam_size": 3, "shortlist_size": 30}
    assert EliasConfig.from_dict(m["config"]).model.dim == DIM
    # The index answers raw-text queries by itself, exactly as the model does.
    enc = ix.load_encoder()
    queries = ["wine market", "dairy quotas for milk", "steel"]
    emb = enc.encode(queries)
    torch.testing.assert_close(emb, tm.model.encoder.encode(queries))
    a, b = search(emb, ref, k=10, beam_size=3), search(emb, ix.tensors, k=10, beam_size=3)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_encoder_file_corruption_is_caught_by_verify(model_dir: Path, tmp_path: Path):
    out = build_index(model_dir, tmp_path / "idx", progress=False)
    f = out / "encoder" / "encoder.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(fmt.IndexFormatError, match="encoder/encoder.safetensors: sha256 mismatch"):
        fmt.verify_index(out)


def test_rebuild_replaces_an_existing_index(model_dir: Path, tmp_path: Path):
    build_index(model_dir, tmp_path / "idx", dtype="fp32", progress=False)
    build_index(model_dir, tmp_path / "idx", dtype="int8", progress=False)
    assert read_index(tmp_path / "idx").manifest["label_weights"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_prune_keeps_the_top_edges_and_every_label_reachable():
    g = torch.Generator().manual_seed(0)
    Lp, Cp, K = 500, 20, 60
    ids = torch.stack([torch.randperm(Lp, generator=g)[:K] for _ in range(Cp)])
    ids[0] = torch.cat([torch.arange(Lp - 25, Lp), torch.randperm(Lp - 25, generator=g)[: K - 25]])
    ids[:, -5:] = Lp  # some padding
    w = edge_weights(torch.randn(Cp, K, generator=g), ids, Lp, beta=20.0)
    had = torch.unique(ids[ids != Lp])
    new_ids, new_w, stats = prune_graph(ids, w, 10, Lp)
    assert torch.equal(torch.unique(new_ids[new_ids != Lp]), had)  # nobody reachable before is lost
    assert stats.kappa_after == new_ids.shape[1] >= 10 and stats.restored_edges > 0
    assert stats.labels_without_edge == Lp - len(had)
    assert stats.edges_after == int((new_ids != Lp).sum()) == 10 * Cp + stats.restored_edges
    for c in range(Cp):  # the first 10 slots are the row's 10 heaviest edges, weights unchanged
        top = torch.topk(w[c].masked_fill(ids[c] == Lp, -1), 10)
        assert set(new_ids[c, :10].tolist()) == set(ids[c, top.indices].tolist())
        for lab, wt in zip(new_ids[c].tolist(), new_w[c].tolist(), strict=True):
            if lab != Lp:
                assert wt == w[c][ids[c] == lab].item()
    # A restored edge is that label's best edge over all rows.
    for c, s in zip(*torch.nonzero(new_ids[:, 10:] != Lp, as_tuple=True), strict=True):
        lab = int(new_ids[c, 10 + s])
        assert new_w[c, 10 + s] == w[ids == lab].max()


def test_prune_wider_than_the_rows_changes_nothing():
    ids = torch.tensor([[0, 1, 3], [2, 3, 3]])
    w = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, 0.0]])
    new_ids, new_w, stats = prune_graph(ids, w, 5, 3)
    assert torch.equal(new_ids, ids) and stats.kappa_after == 3 and stats.restored_edges == 0


def test_cli_build_info_verify(model_dir: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "idx"
    r = runner.invoke(app, ["build-index", str(model_dir), str(out), "--dtype", "int8", "--kappa", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "index written to" in r.output and "pruned A to 5 edges per row" in r.output
    m = read_index(out).manifest
    assert m["pruning"]["kappa_requested"] == 5 and m["model"]["kappa"] == m["pruning"]["kappa_after"]
    r = runner.invoke(app, ["index", "info", str(out)])
    assert r.exit_code == 0, r.output
    for text in ("elias-index v3", "int8", "W_L_scale", "row_labels", "labels.jsonl", "encoder/encoder.json", "tfidf"):
        assert text in r.output
    assert re.search(r"cluster weights W_C\W+fp16", r.output)  # int8 W_L: W_C stored in fp16
    assert re.search(r"label order\W+by cluster", r.output)
    r = runner.invoke(app, ["index", "verify", str(out)])
    assert r.exit_code == 0 and r.output.startswith("ok:"), r.output
    (out / "labels.jsonl").write_text("")
    r = runner.invoke(app, ["index", "verify", str(out)])
    assert r.exit_code == 2 and "labels.jsonl: 0 bytes, manifest.json says" in r.output
    r = runner.invoke(app, ["build-index", str(model_dir), str(tmp_path / "x"), "--dtype", "fp8"])
    assert r.exit_code == 2 and "--dtype must be one of fp32, fp16, int8" in r.output
    r = runner.invoke(app, ["index", "info", str(tmp_path)])
    assert r.exit_code == 2 and "manifest.json: missing" in r.output
