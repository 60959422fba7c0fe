"""The CUDA paths: search, the searcher, training, an index loaded to the GPU and the gRPC server on it.

Every test here needs a CUDA device and is skipped without one (the `cuda` marker selects them: `pytest -m cuda`;
bench/gpu_check.sh runs them on a GPU machine). Where there is an answer to compare, the GPU's is checked against
the CPU's on the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_searcher import random_tensors

from elias_retrieval.client import SearchClient
from elias_retrieval.config import EliasConfig
from elias_retrieval.search import search
from elias_retrieval.searcher import Searcher
from elias_retrieval.server import ServerConfig, start_server
from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the fraction of `a`'s ids that are also in `b`'s row (ids -1 ignored)."""
    return float(np.mean([len(set(x) & set(y) - {-1}) / max(1, len(set(x) - {-1})) for x, y in zip(a.tolist(),
                                                                                                  b.tolist(),
                                                                                                  strict=True)]))


# Few labels: the dense dedupe and one W_L product; many: the sort dedupe (CUDA's large-L route) and a gather.
@pytest.mark.parametrize("num_labels", [2000, 100_000])
def test_search_on_cuda_equals_search_on_cpu_for_the_same_tensors(num_labels: int):
    t = random_tensors(L=num_labels, C=64, kappa=100, d=32, seed=5)
    emb = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    cpu = search(emb, t, k=20, beam_size=8, shortlist_size=500)
    gpu = search(emb.cuda(), t.to("cuda"), k=20, beam_size=8, shortlist_size=500)
    assert gpu.ids.device.type == "cuda"
    # Same products in the same fp32: the same answers up to the order of near-equal scores.
    assert overlap(gpu.ids.cpu().numpy(), cpu.ids.numpy()) >= 0.99
    np.testing.assert_allclose(gpu.scores.float().cpu().numpy(), cpu.scores.float().numpy(), atol=1e-5)


def test_searcher_on_cuda_answers_as_on_cpu_with_a_half_precision_index():
    t = synthetic_tensors(20_000, dim=32, kappa=200, num_clusters=256, seed=0)  # fp16 W_L, as an index stores it
    q = synthetic_queries(t, 200, seed=2)[0].numpy()
    on_cpu = Searcher(t, None, None, device="cpu").search_embeddings(q, k=10)
    s = Searcher(t, None, None, device="cuda")
    assert s.info.device == "cuda" and s.tensors.W_L.device.type == "cuda"
    on_gpu = s.search_embeddings(q, k=10)
    # W_C runs in fp16 on the GPU and fp32 on the CPU: the same labels, scores within half-precision rounding.
    assert overlap(on_gpu.ids, on_cpu.ids) >= 0.95
    assert (on_gpu.ids[:, 0] == on_cpu.ids[:, 0]).mean() >= 0.95
    np.testing.assert_allclose(on_gpu.scores, on_cpu.scores, atol=1e-2)


def write_topic_dataset(root: Path, docs: int = 400, labels: int = 40, seed: int = 0) -> Path:
    """A small JSON-lines dataset (train, dev, test) whose texts are drawn from their labels' own words, so a few
    training steps learn it; written here so that a GPU machine without the project's data runs these tests."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", docs), ("dev", docs // 4), ("test", docs // 4)):
        with open(root / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                ls = rng.choice(labels, size=int(rng.integers(1, 4)), replace=False)
                words = [f"topic{lab}word{w}" for lab in ls for w in rng.integers(0, 8, size=6)]
                f.write(json.dumps({"text": " ".join(words), "labels": [f"L{lab}" for lab in ls]}) + "\n")
    return root


@pytest.fixture(scope="module")
def cuda_index(tmp_path_factory) -> Path:
    """A few training steps on CUDA (test_cli's TINY run, train.device=cuda), built into an index."""
    from test_cli import TINY

    from index_builder.build import build_index
    from trainer.train import train

    work = tmp_path_factory.mktemp("cuda")
    data = write_topic_dataset(work / "data")
    trained = train(data, work / "model", EliasConfig().with_overrides([*TINY, "train.device=cuda"]),
                    progress=False)
    assert next(trained.model.parameters()).device.type == "cuda"
    return build_index(work / "model", work / "index", progress=False)


def test_training_on_cuda_runs_its_steps_and_learns(cuda_index):
    meta = json.loads((cuda_index.parent / "model" / "model.json").read_text())
    assert sorted({r["stage"] for r in meta["history"]}) == [1, 2], meta["history"]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in meta["history"]), meta["history"]
    assert max(r["dev"]["P@1"] for r in meta["history"] if "dev" in r) >= 20.0, meta["history"]  # chance: 5


def test_an_index_loaded_to_cuda_answers_as_on_cpu(cuda_index):
    gpu, cpu = Searcher.open(cuda_index, device="cuda"), Searcher.open(cuda_index, device="cpu")
    assert gpu.info.device == "cuda" and gpu.tensors.W_L.device.type == "cuda"
    emb = np.random.default_rng(0).standard_normal((32, gpu.info.dim)).astype(np.float32)
    a, b = gpu.search_embeddings(emb, k=10), cpu.search_embeddings(emb, k=10)
    assert overlap(a.ids, b.ids) >= 0.9
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-2)


def test_the_grpc_server_on_cuda_answers_a_query(cuda_index):
    searcher = Searcher.open(cuda_index, device="cuda")
    server = start_server(searcher, ServerConfig(host="127.0.0.1", port=0))
    client = SearchClient(server.address, timeout=30)
    try:
        assert client.info().device == "cuda"
        emb = np.linspace(-1, 1, searcher.info.dim).astype(np.float32)
        res = client.search(embedding=emb, k=5)
        np.testing.assert_array_equal(res.ids, searcher.search_embeddings(emb[None], k=5).ids)
        assert len(res.label_ids[0]) == 5
        text = "topic3word1 topic3word4 topic3word6"  # the tf-idf encoder on the GPU
        by_text = client.search(text=text, k=5)
        np.testing.assert_array_equal(by_text.ids, searcher.search_texts([text], k=5).ids)
        assert "L3" in by_text.label_ids[0]
    finally:
        client.close()
        server.stop(0)

