"""An index trained from each input shape (XC BoW, JSON lines, scipy .npz) is built, served by a real `elias serve`
process, and answers the query kinds it takes; text sent to an index without a text vocabulary is refused."""

from __future__ import annotations

import gzip
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import scipy.sparse as sp
from test_cli import TINY, _cli, _one_line_error

from elias_retrieval.client import SearchClient
from elias_retrieval.data import read_split
from elias_retrieval.searcher import Searcher

REPO = Path(__file__).resolve().parents[1]
ROWS = 300


def _xc(shared: Path, out: Path) -> Path:
    return shared / "xc" / "bibtex"


def _npz(shared: Path, out: Path) -> Path:
    for split in ("train", "test"):
        ds = read_split(shared / "xc" / "bibtex", split, max_rows=ROWS)
        sp.save_npz(out / f"{split}.X.npz", ds.features)
        sp.save_npz(out / f"{split}.Y.npz", ds.labels)
    return out


def _jsonl(shared: Path, out: Path) -> Path:
    for split in ("train", "test"):
        with gzip.open(shared / "tibkat" / f"{split}.jsonl.gz", "rt") as f, open(out / f"{split}.jsonl", "w") as g:
            g.writelines(itertools.islice(f, ROWS))
    return out


SHAPES = {"xc": (_xc, ["embedding", "sparse"]), "npz": (_npz, ["embedding", "sparse"]),
          "jsonl": (_jsonl, ["embedding", "text", "sparse"])}


@pytest.fixture(scope="module", params=list(SHAPES))
def built(request, shared_data_dir, tmp_path_factory) -> tuple[str, Path]:
    shape = request.param
    base = tmp_path_factory.mktemp(shape)
    (base / "data").mkdir()
    dataset = SHAPES[shape][0](shared_data_dir, base / "data")
    sets = [a for s in [*TINY, "train.reranker=true"] for a in ("--set", s)]
    res = _cli("train", dataset, base / "model", "--quiet", *sets)
    assert res.exit_code == 0, res.output
    res = _cli("build-index", base / "model", base / "index", "--quiet")
    assert res.exit_code == 0, res.output
    return shape, base / "index"


@pytest.fixture(scope="module")
def served(built) -> Iterator[tuple[str, Path, str]]:
    shape, index = built
    proc = subprocess.Popen([sys.executable, "-m", "elias_retrieval", "serve", str(index), "--port", "0",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "COLUMNS": "400"})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        found = re.search(r" on (127\.0\.0\.1:\d+)", line)
        assert found, f"{line!r}\n{proc.stderr.read() if proc.poll() is not None else ''}"  # type: ignore[union-attr]
        yield shape, index, found.group(1)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_the_served_index_answers_each_query_kind_it_takes(served):
    shape, index, address = served
    kinds = SHAPES[shape][1]
    local = Searcher.open(index, device="cpu")
    assert local.info.query_kinds == kinds
    with SearchClient(address, timeout=10) as c:
        info = c.info()
        assert list(info.query_kinds) == kinds
        emb = np.random.default_rng(0).standard_normal(info.dim).astype(np.float32)
        got = c.search(embedding=emb, k=5)
        assert got.ids.tolist() == local.search_embeddings(emb, k=5).ids.tolist()
        sparse = (np.array([0, 3, 7]), np.array([0.5, 0.2, 0.8], np.float32))
        got = c.search(sparse=sparse, k=5)
        assert got.ids.shape == (1, 5) and (got.ids >= 0).all()
        assert got.ids.tolist() == local.search_sparse([sparse], k=5).ids.tolist()
        if "text" in kinds:
            text = "Geschichte der Stadt im Mittelalter"
            assert c.search(text=text, k=5).ids.tolist() == local.search_texts([text], k=5).ids.tolist()
        else:
            with pytest.raises(grpc.RpcError) as e:
                c.search(text="some text", k=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "query.text" in e.value.details() and "sparse features or an embedding" in e.value.details()


def test_text_search_on_an_index_without_text_is_one_error_line(built):
    shape, index = built
    if "text" in SHAPES[shape][1]:
        res = _cli("search", index, "Geschichte der Stadt", "-k", "3")
        assert res.exit_code == 0, res.output
    else:
        _one_line_error(_cli("search", index, "some text"), "takes no text", "sparse features or an embedding")
