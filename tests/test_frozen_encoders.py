"""The frozen and hybrid encoders: embeddings, the cache, bf16 agreement, save/load, training, an index, search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encoders import TEXTS
from typer.testing import CliRunner

from elias_retrieval.cli import index, serve, train  # noqa: F401  (registers the verbs on `app`)
from elias_retrieval.cli.app import app
from elias_retrieval.config import FeatureConfig
from elias_retrieval.data import read_split
from elias_retrieval.encoders import EncoderError, TfidfEncoder, TransformerEncoder, load_encoder
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.frozen_encoders import (
    EmbeddingCache,
    FrozenTransformer,
    FrozenTransformerEncoder,
    HybridEncoder,
    HybridInputs,
)
from elias_retrieval.searcher import Searcher

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frozen(path: Path) -> FrozenTransformer:
    return FrozenTransformer(TransformerEncoder(path, pooling="mean", max_length=48))


def test_embeddings_are_unit_rows_independent_of_batch_order_and_padding(tiny_bert):
    fz = _frozen(tiny_bert)
    texts = TEXTS * 20  # 80 texts: two length-sorted batches with different padding
    E = fz.embed(texts)
    assert E.shape == (80, 32)
    torch.testing.assert_close(E.norm(dim=1), torch.ones(80))
    alone = torch.cat([fz.embed([t]) for t in TEXTS])
    torch.testing.assert_close(E[:4], alone, rtol=1e-4, atol=1e-5)
    assert not fz.transformer.model.embeddings.word_embeddings.weight.requires_grad


def test_bf16_embeddings_agree_with_fp32(tiny_bert):
    fz = _frozen(tiny_bert)
    fz.bf16 = "fp32"
    a = fz.embed(TEXTS)
    fz.bf16 = "bf16"
    b = fz.embed(TEXTS)
    assert not torch.equal(a, b)  # bf16 did run
    assert (a * b).sum(1).min() > 0.99


def test_the_cache_embeds_once_and_is_keyed_by_weights_not_by_path(tiny_bert, tmp_path, monkeypatch):
    fz = _frozen(tiny_bert)
    cache = EmbeddingCache(tmp_path / "cache")
    E = cache.embed(fz, TEXTS * 30)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    fz.transformer.save(tmp_path / "copy")  # the model saved elsewhere is the same model
    copy = FrozenTransformer(TransformerEncoder(tmp_path / "copy", pooling="mean", max_length=48))
    monkeypatch.setattr(FrozenTransformer, "embed", lambda *a, **k: pytest.fail("embedded again"))
    torch.testing.assert_close(cache.embed(copy, TEXTS * 30), E)
    assert cache.key(copy, TEXTS) != cache.key(copy, TEXTS[::-1])
    other = FrozenTransformer(TransformerEncoder(tiny_bert, pooling="cls", max_length=48))
    assert cache.key(other, TEXTS) != cache.key(fz, TEXTS)


def test_frozen_encoder_round_trip_and_gradients_only_in_its_layer(tiny_bert, tmp_path):
    torch.manual_seed(0)
    enc = FrozenTransformerEncoder(_frozen(tiny_bert), 24)
    with torch.no_grad():
        enc.hidden.weight.normal_(std=0.2)
    inputs = enc.prepare(TEXTS)
    out = enc(inputs.batch(np.arange(4), torch.device("cpu")))
    out.square().sum().backward()
    trained = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert trained == {"proj.weight", "proj.bias", "hidden.weight", "hidden.bias"}
    enc.save(tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert isinstance(loaded, FrozenTransformerEncoder) and loaded.dim == 24
    torch.testing.assert_close(loaded.encode(TEXTS), enc.encode(TEXTS))
    # a tokenised batch (no precomputed embeddings) goes through the transformer: the same result
    tok = loaded.frozen.transformer.prepare(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tok.batch(np.arange(4), torch.device("cpu"))), enc.encode(TEXTS),
                                   rtol=1e-4, atol=1e-5)


def test_hybrid_is_the_tfidf_encoder_plus_the_projected_embedding(tiny_bert, eurlex_small, tmp_path):
    data = read_split(eurlex_small, "train", max_rows=50)
    torch.manual_seed(0)
    tfidf = TfidfEncoder(TfidfFeaturizer.fit(data, FeatureConfig()), 16)
    enc = HybridEncoder(tfidf, _frozen(tiny_bert))
    inputs = enc.prepare(data)
    assert isinstance(inputs, HybridInputs) and len(inputs) == 50
    batch = inputs.batch(np.arange(8), torch.device("cpu"))
    with torch.no_grad():
        want = tfidf(batch) + batch["embeddings"] @ enc.dense.weight.T
        torch.testing.assert_close(enc(batch), want)
    assert [p for p in enc.sparse_params()] == [tfidf.proj.weight]
    enc.save(tmp_path / "enc")
    assert not (tmp_path / "enc" / "featurizer").exists()  # its featurizer is the tf-idf part's, not the encoder's
    loaded = load_encoder(tmp_path / "enc")
    assert isinstance(loaded, HybridEncoder)
    torch.testing.assert_close(loaded.encode(data), enc.encode(data))
    with pytest.raises(EncoderError, match="tf-idf rows"):
        loaded(enc.frozen.transformer.prepare(TEXTS).batch(np.arange(2), torch.device("cpu")))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["frozen", "hybrid"])
def test_train_build_and_search_with_a_frozen_transformer(kind, tiny_bert, eurlex_small, tmp_path):
    out, idx = tmp_path / "model", tmp_path / "index"
    sets = [f"model.transformer_path={tiny_bert}", "model.max_length=48", "model.pooling=mean", "model.dim=32",
            "train.stage1_epochs=2", "train.stage2_epochs=1", "train.stage1_min_examples=0",
            "train.stage2_min_examples=0", "train.batch_size=64", "train.threads=1", "train.device=cpu"]
    res = runner.invoke(app, ["train", str(eurlex_small), str(out), "--encoder", kind, "--quiet",
                              *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    meta = json.loads((out / "model.json").read_text())
    assert meta["encoder"] == kind and meta["selected"]["stage"] in (1, 2)
    assert len(list((out / "embeddings").glob("*.safetensors"))) == 2  # train and dev, each embedded once
    res = runner.invoke(app, ["eval", str(out), str(eurlex_small), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_points"] == 100 and m["R@100"] > 0

    res = runner.invoke(app, ["build-index", str(out), str(idx), "--quiet"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert not (idx / "encoder" / "embeddings").exists()
    s = Searcher.open(idx)
    assert s.info.encoder == kind and sorted(s.info.query_kinds) == ["embedding", "text"]
    res = runner.invoke(app, ["search", str(idx), "-k", "3", TEXTS[0]])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) >= 3
