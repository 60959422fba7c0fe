"""Prometheus metrics (scraped over HTTP) and JSON access logs of `SearchServer`, and `elias serve` wiring them up."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from pki import make_pki
from prometheus_client.parser import text_string_to_metric_families
from test_searcher import D, FakeTfidfEncoder, L, Labels, random_tensors
from test_server import slow_searcher

from elias_retrieval.client import SearchClient
from elias_retrieval.observability import ACCESS_LOGGER
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.searcher import Query, Searcher
from elias_retrieval.server import ServerConfig, start_server
from elias_retrieval.synthetic import write_synthetic_index

REPO = Path(__file__).resolve().parent.parent
SEARCHER = "elias.v1.Searcher"


def searcher_version(version: str) -> Searcher:
    info = {"index_version": version, "defaults": {"k": 10, "beam_size": 4, "shortlist_size": 50}}
    return Searcher(random_tensors(), FakeTfidfEncoder(), Labels(L), info, device="cpu")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} from http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def handled(m: dict, method: str, code: str, service: str = SEARCHER) -> float:
    return sample(m, "grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code)


def calls(client: SearchClient, n_ok: int) -> None:
    for _ in range(n_ok):
        client.search(embedding=np.ones(D, np.float32), k=3)
    for bad in (pb.SearchRequest(), pb.SearchRequest(query=pb.Query(text="a"), params=pb.SearchParams(k=0))):
        with pytest.raises(grpc.RpcError) as e:
            client.stub.Search(bad, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def metered():
    server = start_server(searcher_version("test-v1"), ServerConfig(host="127.0.0.1", port=0, metrics_port=0,
                                                                    max_wait_us=20_000), warmup=False)
    client = SearchClient(server.address, timeout=10)
    yield server, client
    client.close()
    server.stop(0)


def test_metrics_count_calls_by_method_and_code_with_latency_and_batch_sizes(metered):
    server, client = metered
    calls(client, 3)
    client.search_batch([Query(text="wine"), Query(embedding=np.ones(D, np.float32)), Query(text="market")], k=3)
    with pytest.raises(grpc.RpcError):
        client.stub.SearchBatch(pb.SearchBatchRequest(), timeout=5)
    client.info()
    assert client.health() == "SERVING"
    with ThreadPoolExecutor(8) as pool:  # concurrent calls: the batcher's worker searches some together
        list(pool.map(lambda e: client.search(embedding=e, k=3),
                      np.random.default_rng(0).normal(size=(8, D)).astype(np.float32)))
    server.index_load_seconds = 1.25
    m = scrape(server.metrics_port)

    assert handled(m, "Search", "OK") == 11 and handled(m, "Search", "INVALID_ARGUMENT") == 2
    assert handled(m, "SearchBatch", "OK") == 1 and handled(m, "SearchBatch", "INVALID_ARGUMENT") == 1
    assert handled(m, "GetIndexInfo", "OK") == 1
    assert handled(m, "Check", "OK", service="grpc.health.v1.Health") == 1
    latency = dict(grpc_service=SEARCHER, grpc_method="Search")
    assert sample(m, "grpc_server_handling_seconds_count", **latency) == 13
    assert sample(m, "grpc_server_handling_seconds_bucket", **latency, le="+Inf") == 13
    assert 0 < sample(m, "grpc_server_handling_seconds_bucket", **latency, le="1.0") <= 13
    assert sample(m, "grpc_server_handling_seconds_sum", **latency) > 0

    b = server.servicer.batcher  # the histogram agrees with the batcher's own statistics
    assert sample(m, "elias_batch_size_count", route="inline") == b.inline >= 3
    assert sample(m, "elias_batch_size_count", route="batched") == b.batches
    assert sample(m, "elias_batch_size_sum", route="batched") == b.queries
    assert b.inline + b.queries == 11  # every OK Search; SearchBatch does not go through the batcher
    assert sample(m, "elias_rpc_in_flight") == 0 and sample(m, "elias_rpc_max_concurrent") == 64
    assert sample(m, "elias_index_info", index_version="test-v1") == 1
    assert sample(m, "elias_index_load_seconds") == 1.25
    assert sample(m, "process_cpu_seconds_total") > 0


def test_metrics_follow_a_swapped_index(metered):
    server, client = metered
    client.search(embedding=np.ones(D, np.float32), k=3)
    server.attach(searcher_version("test-v2"), warmup=False)
    client.search(embedding=np.ones(D, np.float32), k=3)
    m = scrape(server.metrics_port)
    assert sample(m, "elias_index_info", index_version="test-v2") == 1
    assert ("elias_index_info", frozenset({"index_version": "test-v1"}.items())) not in m
    assert sample(m, "elias_batch_size_count", route="inline") == 2  # the new index's batcher reports too


def test_refused_and_late_calls_are_counted_with_their_codes():
    server = start_server(slow_searcher(0.4), ServerConfig(host="127.0.0.1", port=0, metrics_port=0, batching=False,
                                                           max_concurrent_rpcs=2), warmup=False)
    try:
        with SearchClient(server.address) as c, ThreadPoolExecutor(6) as pool:
            def call(timeout: float) -> str:
                try:
                    c.search(embedding=np.ones(D), timeout=timeout)
                    return "OK"
                except grpc.RpcError as e:
                    return e.code().name

            codes = list(pool.map(call, [10] * 6))
            assert "RESOURCE_EXHAUSTED" in codes, codes
            assert call(0.1) == "DEADLINE_EXCEEDED"  # the search finishes after the caller's deadline
            deadline = time.monotonic() + 5
            while handled(m := scrape(server.metrics_port), "Search", "DEADLINE_EXCEEDED") == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for code in ("OK", "RESOURCE_EXHAUSTED"):
            assert handled(m, "Search", code) == codes.count(code), (code, codes)
        assert handled(m, "Search", "INVALID_ARGUMENT") == 0  # this server's own registry: no other test's calls
        assert sample(m, "grpc_server_handling_seconds_count", grpc_service=SEARCHER,
                      grpc_method="Search") == codes.count("OK") + 1  # refused calls never ran
    finally:
        server.stop(0)


def test_access_log_has_one_json_line_per_call(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    server = start_server(searcher_version("test-v1"), ServerConfig(host="127.0.0.1", port=0, access_log=True),
                          warmup=False)
    try:
        with SearchClient(server.address) as c:
            calls(c, 1)
            c.search_batch([Query(text="wine"), Query(text="market")], k=2)
            assert c.health() == "SERVING"  # counted, not logged
    finally:
        server.stop(0)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [(x["method"], x["code"], x["queries"]) for x in lines] == [
        ("/elias.v1.Searcher/Search", "OK", 1), ("/elias.v1.Searcher/Search", "INVALID_ARGUMENT", 1),
        ("/elias.v1.Searcher/Search", "INVALID_ARGUMENT", 1), ("/elias.v1.Searcher/SearchBatch", "OK", 2)]
    for x in lines:
        assert x["index_version"] == "test-v1" and x["ms"] > 0 and re.match(r"ipv[46]:", x["peer"]), x
        assert set(x) >= {"ts", "method", "code", "ms", "peer", "queries", "index_version"}
    assert "error" not in lines[0] and lines[1]["error"].startswith("query:")


def test_no_access_log_unless_asked(caplog, metered):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    _, client = metered
    calls(client, 2)
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_elias_serve_with_tls_metrics_and_access_log(tmp_path):
    index = write_synthetic_index(tmp_path / "index", 400, dim=D, kappa=40, dtype="fp32",
                                  defaults={"k": 5, "beam_size": 3, "shortlist_size": 50})
    pki = make_pki(tmp_path / "pki")
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "elias_retrieval", "serve", str(index), "--port", "0", "--device", "cpu",
           "--threads", "1", "--metrics-port", str(metrics_port), "--access-log",
           "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"})
    try:
        out = proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r" on 127\.0\.0\.1:(\d+):.*, TLS$", out.strip())
        assert m, out + proc.stderr.read()  # type: ignore[union-attr]
        assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in proc.stdout.readline()  # type: ignore[union-attr]
        with SearchClient(f"127.0.0.1:{m.group(1)}", timeout=10, tls_ca=pki.ca) as c:
            assert c.search(embedding=np.ones(D, np.float32)).ids.shape == (1, 5)
            version = c.info().index_version
        metrics = scrape(metrics_port)
        assert handled(metrics, "Search", "OK") == 1 and handled(metrics, "GetIndexInfo", "OK") == 1
        assert sample(metrics, "elias_index_info", index_version=version) == 1
        assert sample(metrics, "elias_index_load_seconds") > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        logged = [json.loads(ln) for ln in proc.stderr.read().splitlines() if ln.startswith("{")]  # type: ignore[union-attr]
        assert [(x["method"], x["code"]) for x in logged] == [("/elias.v1.Searcher/Search", "OK"),
                                                            ("/elias.v1.Searcher/GetIndexInfo", "OK")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_cli_refuses_bad_metrics_ports(tmp_path):
    from test_cli import _cli, _one_line_error

    _one_line_error(_cli("serve", tmp_path, "--metrics-port", "-1"), "--metrics-port must be at least 0")
    _one_line_error(_cli("serve", tmp_path, "--port", "9100", "--metrics-port", "9100"), "must differ from --port")
