"""Hot index swap: SIGHUP and elias.v1.Admin/ReloadIndex replace the served index without failing a call, and a
missing, corrupt, truncated or incompatible index is refused while the old one keeps serving."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from elias_retrieval.client import SearchClient
from elias_retrieval.data import LabelVocab
from elias_retrieval.index_format import TENSORS, write_index
from elias_retrieval.index_swap import SwapRefused, incompatibility, point_symlink
from elias_retrieval.searcher import Searcher
from elias_retrieval.server import SearchServer, ServerConfig
from elias_retrieval.synthetic import synthetic_tensors

REPO = Path(__file__).resolve().parent.parent
L, DIM = 400, 16
DEFAULTS = {"k": 10, "beam_size": 4, "shortlist_size": 100}


def build(path: Path, seed: int, dim: int = DIM) -> Path:
    t = synthetic_tensors(L, dim=dim, kappa=200, num_clusters=4, seed=seed, dtype="fp32")
    write_index(path, t, LabelVocab([f"L{i}" for i in range(L)]), None, dtype="fp32", defaults=DEFAULTS, meta={})
    return path


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("indexes")
    return {"v1": build(base / "v1", seed=1), "v2": build(base / "v2", seed=2),
            "dim8": build(base / "dim8", seed=3, dim=8)}


def queries(n: int = 8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)


def answers(index: Path) -> tuple[str, list[list[str]]]:
    s = Searcher.open(index, device="cpu", resident=False)
    return s.index_version, s.search_embeddings(queries()).label_ids


def served_answers(client: SearchClient) -> tuple[set[str], list[list[str]]]:
    hits, versions = [], set()
    for q in queries():
        hits.append(client.search(embedding=q).label_ids[0])
        versions.add(client.last_index_version)
    return versions, hits


@pytest.fixture()
def admin_server(indexes: dict[str, Path], tmp_path: Path) -> Iterator[tuple[SearchServer, SearchClient, Path]]:
    link = tmp_path / "current"
    point_symlink(link, indexes["v1"])
    server = SearchServer(ServerConfig(host="127.0.0.1", port=0, admin=True, grace_s=5))
    server.index_path, server.device = link, "cpu"
    server.start()
    server.attach(Searcher.open(link.resolve(), device="cpu"))
    client = SearchClient(server.address, timeout=10)
    yield server, client, link
    client.close()
    server.stop(0)


def test_admin_reload_follows_the_flipped_symlink(admin_server, indexes):
    server, client, link = admin_server
    v1, v2 = answers(indexes["v1"]), answers(indexes["v2"])
    assert v1[0] != v2[0] and v1[1] != v2[1]  # the check below can tell the two apart
    assert served_answers(client) == ({v1[0]}, v1[1])
    point_symlink(link, indexes["v2"])
    resp = client.reload_index()
    assert (resp.previous_version, resp.index_version) == (v1[0], v2[0])
    assert resp.load_seconds > 0 and server.index_load_seconds == pytest.approx(resp.load_seconds)
    assert Path(resp.path) == indexes["v2"].resolve()
    assert server.servicer.searcher is not None and server.servicer.searcher.index_version == v2[0]
    assert served_answers(client) == ({v2[0]}, v2[1])
    resp = client.reload_index(str(indexes["v1"]))  # an explicit path
    assert resp.index_version == v1[0] and served_answers(client) == ({v1[0]}, v1[1])


def corrupt(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    with open(dst / TENSORS, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dst


def truncated(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    os.truncate(dst / TENSORS, (dst / TENSORS).stat().st_size // 2)
    return dst


REFUSALS = {
    "corrupt": (corrupt, "sha256 mismatch"),
    "truncated": (truncated, "truncated"),
    "other-dim": (lambda src, dst: dst.parent / "dim8", "embedding dim 8, the served index has 16"),
    "missing": (lambda src, dst: dst.parent / "no-such-index", "no such index directory"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_index_is_refused_and_the_old_one_keeps_serving(admin_server, indexes, tmp_path, caplog, case):
    server, client, link = admin_server
    make, reason = REFUSALS[case]
    bad = make(indexes["v2"], indexes["v1"].parent / f"bad-{case}-{tmp_path.name}")
    v1 = answers(indexes["v1"])
    point_symlink(link, bad)
    with caplog.at_level(logging.ERROR, logger="elias.server"), pytest.raises(grpc.RpcError) as e:
        client.reload_index()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason in e.value.details() and bad.name in e.value.details()
    logged = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert logged and reason in logged[0] and bad.name in logged[0]
    assert client.health() == "SERVING"
    assert served_answers(client) == ({v1[0]}, v1[1])


def test_incompatible_encoder_kind_or_dropped_query_kind_is_named():
    info = Searcher.open(build_tmp(), device="cpu", resident=False).info
    assert incompatibility(info, info) is None
    assert "encoder 'tfidf', the served index has 'none'" in str(incompatibility(info, replace(info, encoder="tfidf")))
    text = replace(info, query_kinds=["embedding", "text"])
    assert "does not take text queries" in str(incompatibility(text, info))


def build_tmp() -> Path:
    import tempfile

    return build(Path(tempfile.mkdtemp()) / "idx", seed=5)


def test_reloads_are_serialised_a_second_one_is_aborted(admin_server, indexes, monkeypatch):
    server, client, link = admin_server
    import elias_retrieval.server as server_module

    started, release = threading.Event(), threading.Event()
    original = server_module.load_for_serving

    def slow_load(*a, **kw):
        started.set()
        release.wait(10)
        return original(*a, **kw)

    monkeypatch.setattr(server_module, "load_for_serving", slow_load)
    point_symlink(link, indexes["v2"])
    results: list[object] = []
    t = threading.Thread(target=lambda: results.append(client.reload_index()))
    t.start()
    assert started.wait(10)
    with pytest.raises(grpc.RpcError) as e:
        client.reload_index()
    assert e.value.code() == grpc.StatusCode.ABORTED and "another index reload is running" in e.value.details()
    assert client.health() == "SERVING"
    release.set()
    t.join(10)
    assert results and results[0].index_version == answers(indexes["v2"])[0]  # type: ignore[attr-defined]


def test_calls_in_flight_during_a_swap_finish_on_their_index(admin_server, indexes):
    server, client, _ = admin_server
    old = server.servicer.searcher
    assert old is not None and server.servicer.batcher is not None
    old_batcher = server.servicer.batcher
    started = threading.Event()
    original = old.search_checked

    def slow(qs, params):
        started.set()
        time.sleep(1.0)
        return original(qs, params)

    old.search_checked = slow  # type: ignore[method-assign]
    out: list[tuple[str, list[str]]] = []

    def call() -> None:
        with SearchClient(server.address, timeout=10) as c:
            out.append((c.search(embedding=queries(1)[0]).label_ids[0], c.last_index_version))  # type: ignore[arg-type]

    callers = [threading.Thread(target=call) for _ in range(4)]
    for c in callers:
        c.start()
    assert started.wait(5)
    deadline = time.monotonic() + 10
    while server.servicer._served.calls < 4:  # every caller is inside the server before the swap
        assert time.monotonic() < deadline, "the calls did not all arrive"
        time.sleep(0.01)
    new = Searcher.open(indexes["v2"], device="cpu")
    t0 = time.perf_counter()
    server.attach(new)  # returns once the old index's calls have finished
    waited = time.perf_counter() - t0
    for c in callers:
        c.join(10)
    assert len(out) == 4 and {v for _, v in out} == {old.index_version}
    assert waited > 0.1  # it did wait for the slow calls
    with pytest.raises(Exception, match="closed"):
        old_batcher.submit(None, None)  # type: ignore[arg-type]
    assert served_answers(client)[0] == {new.index_version}


def test_admin_service_is_only_served_and_listed_with_admin(admin_server, indexes):
    server, client, _ = admin_server
    with grpc.insecure_channel(server.address) as ch:
        assert "elias.v1.Admin" in ProtoReflectionDescriptorDatabase(ch).get_services()
    plain = SearchServer(ServerConfig(host="127.0.0.1", port=0))
    plain.start()
    plain.attach(Searcher.open(indexes["v1"], device="cpu"), warmup=False)
    try:
        with SearchClient(plain.address, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.reload_index()
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with grpc.insecure_channel(plain.address) as ch:
                assert "elias.v1.Admin" not in ProtoReflectionDescriptorDatabase(ch).get_services()
    finally:
        plain.stop(0)


def test_refused_swaps_raise_swap_refused_in_process(admin_server, indexes):
    server, _, _ = admin_server
    with pytest.raises(SwapRefused, match="dim8"):
        server.reload(indexes["dim8"])
    assert server.index_path is not None and server.index_path.name == "current"  # a refused path is not kept


def test_sighup_swaps_a_real_elias_serve_child_via_a_symlink(indexes, tmp_path):
    link = tmp_path / "current"
    point_symlink(link, indexes["v1"])
    proc = subprocess.Popen([sys.executable, "-m", "elias_retrieval", "serve", str(link), "--port", "0",
                             "--device", "cpu", "--threads", "1", "--admin"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "400"})
    log: list[str] = []
    try:
        found = re.search(r" on (127\.0\.0\.1:\d+)", proc.stdout.readline())  # type: ignore[union-attr]
        assert found, proc.stderr.read() if proc.poll() is not None else ""  # type: ignore[union-attr]
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        v1, v2 = answers(indexes["v1"]), answers(indexes["v2"])
        with SearchClient(found.group(1), timeout=10) as client:
            assert served_answers(client) == ({v1[0]}, v1[1])
            stop = threading.Event()
            failures: list[BaseException] = []

            def load() -> None:  # searches all along: none may fail
                with SearchClient(found.group(1), timeout=10) as c:
                    while not stop.is_set():
                        try:
                            c.search(embedding=queries(1)[0])
                        except grpc.RpcError as e:
                            failures.append(e)

            loader = threading.Thread(target=load)
            loader.start()
            point_symlink(link, indexes["v2"])
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while client.info().index_version != v2[0]:
                assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
                time.sleep(0.05)
            assert served_answers(client) == ({v2[0]}, v2[1])
            point_symlink(link, indexes["dim8"])
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not any("reload refused" in x for x in log):
                assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
                time.sleep(0.05)
            stop.set()
            loader.join(10)
            assert not failures
            assert client.health() == "SERVING" and served_answers(client) == ({v2[0]}, v2[1])
        refused = next(x for x in log if "reload refused" in x)
        assert "dim8" in refused and "embedding dim 8" in refused
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
