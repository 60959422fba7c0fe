"""An index carries the model's ELIAS++ re-ranker: eval of the index equals eval of the model, search re-ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from elias_retrieval import index_format as fmt
from elias_retrieval.batching import DynamicBatcher
from elias_retrieval.cli import app
from elias_retrieval.cli import index as _register_index_verbs  # noqa: F401
from elias_retrieval.cli import serve as _register_serve_verbs  # noqa: F401
from elias_retrieval.cli import train as _register_train_verbs  # noqa: F401
from elias_retrieval.client import SearchClient
from elias_retrieval.config import EliasConfig
from elias_retrieval.data import read_split
from elias_retrieval.encoders import TfidfEncoder
from elias_retrieval.evaluation import predict
from elias_retrieval.features import TfidfFeaturizer
from elias_retrieval.index_format import read_index
from elias_retrieval.model import EliasModel
from elias_retrieval.modeldir import load_model_dir, save_model_dir
from elias_retrieval.reranker import SparseRanker
from elias_retrieval.searcher import Query, Searcher
from elias_retrieval.server import ServerConfig, start_server
from index_builder.build import build_index
from trainer.reranker import train_ranker

L, C, KAPPA, DIM, BEAM, SHORTLIST = 150, 8, 40, 16, 4, 200
N_TRAIN, N_TEST = 300, 40


def write_dataset(path: Path) -> Path:
    """Documents made of their labels' words plus noise: easy for a tf-idf ranker, random for the ELIAS below."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        with open(path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                labels = rng.choice(L, size=rng.integers(1, 4), replace=False)
                words = [f"w{lab}{s}" for lab in labels for s in "ab"] + [f"noise{x}" for x in rng.integers(0, 50, 6)]
                rng.shuffle(words)
                labs = [f"lab-{lab}" for lab in labels] if split == "test" or i >= L else [f"lab-{i}"]
                if split == "train" and i < L:  # every label seen in training
                    words = [f"w{i}a", f"w{i}b", *words[:4]]
                f.write(json.dumps({"id": f"{split}-{i}", "title": " ".join(words), "labels": labs}) + "\n")
    return path


def make_model_dir(path: Path, dataset: Path) -> Path:
    """A stage-2 ELIAS (tf-idf encoder, random classifiers, covering A) plus a ranker fitted on its own top 100."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    cfg = EliasConfig()
    cfg.data.text_fields = ["title"]
    cfg.features.min_df, cfg.model.dim, cfg.model.beam_size, cfg.model.shortlist_size = 1, DIM, BEAM, SHORTLIST
    train = read_split(dataset, "train", cfg.data)
    assert train.labels.shape[1] == L
    featurizer, X = TfidfFeaturizer.fit_transform(train, cfg.features)
    model = EliasModel(TfidfEncoder(featurizer, DIM), L, C, KAPPA, cfg.model)
    ids = torch.full((C, KAPPA), L, dtype=torch.long)
    for c in range(C):
        own = torch.arange(c, L, C)
        others = torch.tensor([x for x in rng.permutation(L)[: KAPPA - len(own) - 2] if x % C != c])
        row = torch.cat([own, others])
        ids[c, : len(row)] = row
    model.set_graph(ids, torch.randn(C, KAPPA), stage=2)
    with torch.no_grad():
        model.b_L.normal_()
    model.eval()
    counts = torch.from_numpy(np.asarray(train.labels.sum(0)).ravel().astype(np.int64))
    save_model_dir(path, model, cfg, train.vocab, featurizer, counts, meta={"num_train": len(train)})
    top, _ = predict(model.encoder, model.search_tensors(), train, 100, BEAM, SHORTLIST)
    ranker = train_ranker(X, train.labels, top, n_jobs=1)
    ranker.fusion_weight = 0.65
    ranker.save(path / "ranker")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "d")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "m", dataset)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return build_index(model_dir, tmp_path_factory.mktemp("index") / "idx", dtype="fp32", progress=False)


def eval_json(path: Path, dataset: Path, out: Path, *extra: str) -> dict:
    r = CliRunner().invoke(app, ["eval", str(path), str(dataset), "--json", str(out), *extra])
    assert r.exit_code == 0, r.output
    metrics = json.loads(out.read_text())
    del metrics["source"], metrics["seconds"]
    return metrics


def reference_top(model_dir: Path, dataset: Path, k: int, rerank: bool = True) -> tuple[np.ndarray, list[str]]:
    """The model-dir evaluation path: ELIAS's top 100 (the ranker's depth), re-ranked as `elias eval` does, cut to
    k."""
    tm = load_model_dir(model_dir)
    test = read_split(dataset, "test", tm.config.data, vocab=tm.vocab)
    depth = tm.ranker.depth if rerank and tm.ranker is not None else 100
    ids, scores = predict(tm.model.encoder, tm.model.search_tensors(), test, depth, BEAM, SHORTLIST)
    if rerank:
        assert tm.ranker is not None
        ids, _ = tm.ranker.rerank(tm.featurizer.transform(test), ids, scores)
    return ids[:, :k], test.texts  # type: ignore[return-value]


def test_index_carries_the_ranker_and_verify_covers_it(model_dir: Path, index_dir: Path, tmp_path: Path):
    fmt.verify_index(index_dir)
    ix = read_index(index_dir)
    m = ix.manifest
    for rel in ("ranker/ranker.safetensors", "ranker/ranker.json", "encoder/featurizer/featurizer.json"):
        assert rel in m["files"], rel
    assert not any(rel.startswith("featurizer/") for rel in m["files"])  # the encoder's featurizer is shared
    tm = load_model_dir(model_dir)
    assert tm.ranker is not None
    assert m["reranker"] == {"fusion_weight": 0.65, "nnz": int(tm.ranker.W.nnz), "depth": 100,
                             "shape": [L, tm.featurizer.num_features], "featurizer": "encoder/featurizer"}
    ranker, featurizer = ix.load_ranker(), ix.load_featurizer()
    assert ranker is not None and featurizer is not None
    assert (ranker.W != tm.ranker.W).nnz == 0 and np.array_equal(ranker.bias, tm.ranker.bias)
    assert ranker.fusion_weight == 0.65 and featurizer.num_features == tm.featurizer.num_features
    bad = tmp_path / "bad"
    shutil.copytree(index_dir, bad)
    f = bad / "ranker" / "ranker.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    read_index(bad)  # sizes are right: only the hashes see it
    with pytest.raises(fmt.IndexFormatError, match="ranker/ranker.safetensors: sha256 mismatch"):
        fmt.verify_index(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["files"]["ranker/ranker.json"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fmt.IndexFormatError, match="does not list ranker/ranker.json"):
        read_index(bad)


def test_eval_of_the_index_equals_eval_of_the_model(model_dir: Path, index_dir: Path, dataset: Path, tmp_path: Path):
    plus = eval_json(model_dir, dataset, tmp_path / "m.json")
    assert plus["method"] == "ELIAS++"
    assert eval_json(index_dir, dataset, tmp_path / "i.json") == plus
    plain = eval_json(model_dir, dataset, tmp_path / "m0.json", "--no-rerank")
    assert plain["method"] == "ELIAS" and plain["P@1"] != plus["P@1"]  # the ranker does change the ranking
    assert eval_json(index_dir, dataset, tmp_path / "i0.json", "--no-rerank") == plain


def test_searcher_answers_text_and_sparse_queries_with_elias_plus_plus(model_dir: Path, index_dir: Path,
                                                                       dataset: Path):
    want, texts = reference_top(model_dir, dataset, k=5)
    s = Searcher.open(index_dir, device="cpu", resident=False)
    assert s.info.reranker and s.rerank_kinds == ["text", "sparse"]
    res = s.search_texts(texts, k=5, explain=True)  # re-ranks ELIAS's top 100: a top 5 alone would differ
    assert res.methods == ["ELIAS++"] * len(texts)
    np.testing.assert_array_equal(res.ids, want)
    assert (np.diff(res.scores, axis=1) <= 0).all()  # best first by the fused score
    plain, _ = reference_top(model_dir, dataset, k=5, rerank=False)
    off = s.search_texts(texts, k=5, rerank=False)
    assert off.methods == ["ELIAS"] * len(texts)
    np.testing.assert_array_equal(off.ids, plain)
    # A sparse query is the same tf-idf row: same answer. An embedding cannot be re-ranked: plain ELIAS.
    row = s.featurizer.transform([texts[0]])
    emb = s.encoder.encode([texts[0]])[0].numpy()
    mixed = s.search([Query(sparse=(row.indices, row.data)), Query(embedding=emb), Query(text=texts[0])],
                     s.resolve_params(k=5))
    assert mixed.methods == ["ELIAS++", "ELIAS", "ELIAS++"]
    np.testing.assert_array_equal(mixed.ids[0], want[0])
    np.testing.assert_array_equal(mixed.ids[2], want[0])
    np.testing.assert_array_equal(mixed.ids[1], plain[0])
    # The explanation is re-ordered with the hits.
    full = s.search_texts(texts[:1], k=100, explain=True)
    plain100 = s.search_texts(texts[:1], k=100, explain=True, rerank=False)
    by_id = {int(i): (c, p) for i, c, p in zip(plain100.ids[0], plain100.cluster[0], plain100.path[0], strict=True)}
    for i, c, p in zip(full.ids[0], full.cluster[0], full.path[0], strict=True):
        if i >= 0:
            assert by_id[int(i)] == (c, p)


def test_server_and_cli_say_which_method_answered(index_dir: Path, dataset: Path, model_dir: Path):
    want, texts = reference_top(model_dir, dataset, k=5)
    s = Searcher.open(index_dir, device="cpu", resident=False)
    server = start_server(s, ServerConfig(host="127.0.0.1", port=0))
    try:
        with SearchClient(server.address, timeout=10) as client:
            assert client.info().reranker
            res = client.search(text=texts[1], k=5)
            assert res.methods == ["ELIAS++"]
            np.testing.assert_array_equal(res.ids[0], want[1])
            assert client.search(text=texts[1], k=5, rerank=False).methods == ["ELIAS"]
            batch = client.search_batch([Query(text=texts[2]), Query(text=texts[3])], k=5)
            assert batch.methods == ["ELIAS++", "ELIAS++"]
            np.testing.assert_array_equal(batch.ids, want[2:4])
        # `elias search --server` prints the same table (ranks, scores, label ids and names, explanations) as
        # `elias search INDEX_DIR` in process.
        local, remote = (CliRunner().invoke(app, ["search", *where, texts[0], "-k", "3", "--explain"])
                         for where in ([str(index_dir)], ["--server", server.address]))
        assert local.exit_code == 0 and remote.exit_code == 0, (local.output, remote.output)

        def table(out: str) -> list[str]:
            lines = out.splitlines()
            return lines[: next(i for i, x in enumerate(lines) if " labels by " in x)]

        assert table(remote.output) == table(local.output) and len(table(local.output)) >= 5, local.output
        assert f"3 labels by ELIAS++ from {server.address}" in remote.output, remote.output
    finally:
        server.stop(0)
    runner = CliRunner()
    r = runner.invoke(app, ["search", str(index_dir), texts[0], "-k", "3"])
    assert r.exit_code == 0 and "by ELIAS++" in r.output, r.output
    r = runner.invoke(app, ["search", str(index_dir), texts[0], "-k", "3", "--no-rerank"])
    assert r.exit_code == 0 and "by ELIAS from" in r.output, r.output


def test_no_reranker_build_and_an_index_from_before_the_ranker(model_dir: Path, dataset: Path, tmp_path: Path):
    r = CliRunner().invoke(app, ["build-index", str(model_dir), str(tmp_path / "plain"), "--dtype", "fp32",
                                 "--no-reranker", "--quiet"])
    assert r.exit_code == 0, r.output
    ix = read_index(tmp_path / "plain")
    assert ix.manifest["reranker"] is None and ix.load_ranker() is None
    assert not any(rel.startswith(("ranker/", "featurizer/")) for rel in ix.manifest["files"])
    assert ix.load_featurizer() is not None  # the tf-idf encoder's
    assert Searcher.open(tmp_path / "plain", device="cpu").search_texts(["w1a w1b"], k=3).methods == ["ELIAS"]
    assert eval_json(tmp_path / "plain", dataset, tmp_path / "p.json")["method"] == "ELIAS"
    # An index written before the re-ranker existed has no "reranker" key: it loads as plain ELIAS.
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    del manifest["reranker"]
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps(manifest))
    fmt.verify_index(tmp_path / "plain")
    assert read_index(tmp_path / "plain").load_ranker() is None


def test_a_featurizer_other_than_the_encoders_is_copied(model_dir: Path, dataset: Path, tmp_path: Path):
    other = tmp_path / "m"
    shutil.copytree(model_dir, other)
    meta = json.loads((other / "featurizer" / "featurizer.json").read_text())
    (other / "featurizer" / "featurizer.json").write_text(json.dumps(meta, indent=4))  # same content, other bytes
    out = build_index(other, tmp_path / "idx", dtype="fp32", progress=False)
    fmt.verify_index(out)
    m = read_index(out).manifest
    assert m["reranker"]["featurizer"] == "featurizer" and "featurizer/featurizer.json" in m["files"]
    s = Searcher.open(out, device="cpu")
    assert s.rerank_kinds == ["text"]  # sparse queries are in the encoder's features, not necessarily the ranker's
    assert eval_json(out, dataset, tmp_path / "i.json") == eval_json(other, dataset, tmp_path / "m.json")


def test_a_deeper_ranker_chooses_the_answer_from_its_depth_of_candidates(model_dir: Path, dataset: Path,
                                                                        tmp_path: Path):
    deep = tmp_path / "deep"
    shutil.copytree(model_dir, deep)
    ranker = SparseRanker.load(deep / "ranker")
    ranker.depth = L  # every label a candidate
    ranker.save(deep / "ranker")
    out = build_index(deep, tmp_path / "idx", dtype="fp32", progress=False)
    assert read_index(out).manifest["reranker"]["depth"] == L
    want, texts = reference_top(deep, dataset, k=5)
    shallow, _ = reference_top(model_dir, dataset, k=5)
    assert (want != shallow).any()  # labels from below ELIAS's top 100 were brought up
    s = Searcher.open(out, device="cpu", resident=False)
    res = s.search_texts(texts, k=5)
    np.testing.assert_array_equal(res.ids, want)
    assert eval_json(out, dataset, tmp_path / "i.json") == eval_json(deep, dataset, tmp_path / "m.json")
    # The batcher asks for the same candidates as a lone query.
    batcher = DynamicBatcher(s, max_batch=8, max_wait_us=2000)
    try:
        futures = [batcher.submit(Query(text=t), s.resolve_params(k=5)) for t in texts[:6]]
        np.testing.assert_array_equal(np.stack([f.result(10).ids[0] for f in futures]), want[:6])
    finally:
        batcher.close()
