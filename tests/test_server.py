"""The gRPC service through a real channel to a real server on an ephemeral loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from test_searcher import NUM_FEATURES, C, D, make_searcher

from elias_retrieval.client import SearchClient
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc
from elias_retrieval.searcher import Query
from elias_retrieval.server import SearchServer, ServerConfig, start_server

REPO = Path(__file__).resolve().parent.parent


def loopback(**kwargs) -> ServerConfig:
    return ServerConfig(host="127.0.0.1", port=0, **kwargs)


def slow_searcher(delay: float, started: threading.Event | None = None):
    s = make_searcher()
    original = s.search_checked

    def slow(queries, params):
        if started is not None:
            started.set()
        time.sleep(delay)
        return original(queries, params)

    s.search_checked = slow  # type: ignore[method-assign]
    return s


@pytest.fixture(scope="module")
def served():
    searcher = make_searcher()
    server = start_server(searcher, loopback(max_wait_us=2000))
    client = SearchClient(server.address, timeout=10)
    yield server, searcher, client
    client.close()
    server.stop(0)


def test_search_by_text_sparse_and_embedding_matches_in_process(served):
    server, searcher, client = served
    text = "wine market regulation"
    ids, vals = searcher.encoder.featurize(text)
    local = searcher.search_texts([text], k=7)
    for res in (client.search(text=text, k=7), client.search(sparse=(ids, vals), k=7)):
        np.testing.assert_array_equal(res.ids, local.ids)
        np.testing.assert_allclose(res.scores, local.scores, atol=1e-6)
        assert res.label_ids == local.label_ids and res.label_names == local.label_names
    emb = np.linspace(-1, 1, D).astype(np.float32)
    np.testing.assert_array_equal(client.search(embedding=emb, k=7).ids, searcher.search_embeddings(emb[None], k=7).ids)
    assert client.last_index_version == "test-v1"


def test_search_uses_index_defaults_and_explains(served):
    _, searcher, client = served
    res = client.search(embedding=np.ones(D, np.float32), explain=True)
    assert res.ids.shape == (1, 10)
    np.testing.assert_allclose(res.scores, res.path * res.label_prob, atol=1e-5)
    local = searcher.search_embeddings(np.ones((1, D), np.float32), explain=True)
    np.testing.assert_array_equal(res.cluster, local.cluster)


def test_search_batch_answers_in_order(served):
    _, searcher, client = served
    qs = [Query(text="wine market"), Query(embedding=np.ones(D, np.float32)), Query(sparse=([1, 5], [0.5, 0.5]))]
    res = client.search_batch(qs, k=5, beam_size=C)
    local = searcher.search(qs, searcher.resolve_params(k=5, beam_size=C))
    np.testing.assert_array_equal(res.ids, local.ids)


def test_index_info_reports_shape_defaults_and_limits(served):
    _, _, client = served
    info = client.info()
    assert (info.num_clusters, info.dim, info.num_features) == (C, D, NUM_FEATURES)
    assert info.defaults.k == 10 and info.index_version == "test-v1"
    assert list(info.query_kinds) == ["embedding", "text", "sparse"]


def test_health_is_serving_once_attached():
    server = SearchServer(loopback())
    server.start()
    try:
        with SearchClient(server.address) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.search(embedding=np.ones(D))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            server.attach(make_searcher())
            assert c.health() == "SERVING" and c.health("elias.v1.Searcher") == "SERVING"
    finally:
        server.stop(0)


def test_reflection_lists_and_describes_the_service(served):
    server, _, _ = served
    with grpc.insecure_channel(server.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "elias.v1.Searcher" in services and "grpc.health.v1.Health" in services
        desc = db.FindFileContainingSymbol("elias.v1.Searcher")
        methods = [m.name for m in desc.service[0].method]
        assert methods == ["Search", "SearchBatch", "GetIndexInfo"]


BAD = [
    (pb.SearchRequest(), "query"),
    (pb.SearchRequest(query=pb.Query(text="")), "query.text"),
    (pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[0.0] * (D + 1)))), "query.embedding"),
    (pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[float("nan")] * D))), "query.embedding"),
    (pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[float("inf")] * D))), "query.embedding"),
    (pb.SearchRequest(query=pb.Query(text="a"), params=pb.SearchParams(k=0)), "params.k"),
    (pb.SearchRequest(query=pb.Query(text="a"), params=pb.SearchParams(k=100_000)), "params.k"),
    (pb.SearchRequest(query=pb.Query(text="a"), params=pb.SearchParams(beam_size=C + 1)), "params.beam_size"),
    (pb.SearchRequest(query=pb.Query(text="a"), params=pb.SearchParams(shortlist_size=0)), "params.shortlist_size"),
    (pb.SearchRequest(query=pb.Query(sparse=pb.SparseFeatures(indices=[NUM_FEATURES], values=[1.0]))),
     "query.sparse.indices"),
    (pb.SearchRequest(query=pb.Query(sparse=pb.SparseFeatures(indices=[1, 2], values=[1.0]))),
     "query.sparse.values"),
]


@pytest.mark.parametrize(("request_", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_requests_get_invalid_argument_naming_the_field(served, request_, field):
    server, _, client = served
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Search(request_, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":"), e.value.details()
    assert client.health() == "SERVING"


def test_bad_batch_requests_name_the_query(served):
    _, _, client = served
    for req, field in ((pb.SearchBatchRequest(), "queries"),
                       (pb.SearchBatchRequest(queries=[pb.Query(text="a"), pb.Query()]), "queries[1]")):
        with pytest.raises(grpc.RpcError) as e:
            client.stub.SearchBatch(req, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field + ":")


def test_concurrent_searches_are_batched_and_correct(served):
    server, searcher, client = served
    embs = np.random.default_rng(1).normal(size=(24, D)).astype(np.float32)
    b = server.servicer.batcher
    before = b.queries + b.inline
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda e: client.search(embedding=e, k=5).ids[0], embs))
    np.testing.assert_array_equal(np.stack(got), searcher.search_embeddings(embs, k=5).ids)
    assert b.queries + b.inline - before == 24


def test_deadline_exceeded_and_the_server_keeps_serving():
    server = start_server(slow_searcher(0.5), loopback())
    try:
        with SearchClient(server.address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.search(embedding=np.ones(D), timeout=0.1)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert c.search(embedding=np.ones(D), timeout=10).ids.shape == (1, 10)
    finally:
        server.stop(0)


def test_calls_past_the_concurrency_limit_get_resource_exhausted():
    server = start_server(slow_searcher(0.4), loopback(max_concurrent_rpcs=2, batching=False))
    try:
        with SearchClient(server.address) as c, ThreadPoolExecutor(6) as pool:
            def call(_):
                try:
                    c.search(embedding=np.ones(D), timeout=10)
                    return "OK"
                except grpc.RpcError as e:
                    return e.code().name

            codes = list(pool.map(call, range(6)))
        assert codes.count("OK") >= 2 and "RESOURCE_EXHAUSTED" in codes, codes
    finally:
        server.stop(0)


def test_graceful_stop_lets_calls_in_flight_finish():
    searcher = slow_searcher(0.5)
    entered, lock, all_in = [0], threading.Lock(), threading.Event()
    check = searcher.check_query

    def counting_check(q, prefix="query"):
        with lock:
            entered[0] += 1
            if entered[0] == 4:
                all_in.set()
        return check(q, prefix)

    searcher.check_query = counting_check  # type: ignore[method-assign]
    server = start_server(searcher, loopback(), warmup=False)
    with SearchClient(server.address) as c, ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(c.search, embedding=np.ones(D), timeout=10) for _ in range(4)]
        assert all_in.wait(5)  # all four calls are inside the server
        server.stop(grace=5)
        assert all(f.result().ids.shape == (1, 10) for f in futs)
        with pytest.raises(grpc.RpcError) as e:
            c.search(embedding=np.ones(D), timeout=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


SERVE_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_searcher
    from elias_retrieval import searcher as searcher_mod, server
    def open_slow(path, device="auto", **kw):
        s = test_searcher.make_searcher()
        original = s.search_checked
        s.search_checked = lambda q, p: (time.sleep(0.5), original(q, p))[1]
        return s
    searcher_mod.Searcher.open = staticmethod(open_slow)
    server.serve("unused", server.ServerConfig(port=0, grace_s=5),
                 on_ready=lambda srv, s: print("PORT", srv.port, flush=True))
    print("EXITED", flush=True)
""")


def test_sigterm_stops_the_served_process_after_calls_in_flight():
    script = SERVE_SCRIPT.format(tests=str(REPO / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("PORT"), line
        address = f"127.0.0.1:{line.split()[1]}"
        with grpc.insecure_channel(address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.SearcherStub(ch)
            req = pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[1.0] * D)))
            futs = [stub.Search.future(req, timeout=10) for _ in range(3)]
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert all(len(f.result().result.hits) == 10 for f in futs)
        assert proc.wait(15) == 0
        assert "EXITED" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_requests_over_the_message_size_limit_are_refused():
    server = start_server(make_searcher(), loopback(max_message_bytes=512), warmup=False)
    try:
        with SearchClient(server.address) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.search(embedding=np.ones(1000, np.float32), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.search(embedding=np.ones(D, np.float32), k=3, timeout=5).ids.shape == (1, 3)
    finally:
        server.stop(0)


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x03\x0a\x01\xff", b"\x0a\x02\x0a"],
                         ids=["bad-wire-type", "invalid-utf8-text", "truncated"])
def test_bytes_that_are_not_a_request_get_invalid_argument_not_internal(served, body):
    server, _, client = served
    with grpc.insecure_channel(server.address) as ch:
        for method in ("Search", "SearchBatch"):
            raw = ch.unary_unary(f"/elias.v1.Searcher/{method}", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as e:
                raw(body, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details().startswith(f"request: not a valid elias.v1.{method}Request")
        raw = ch.unary_unary("/elias.v1.Searcher/Search", request_serializer=None, response_deserializer=None)
        good = pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[1.0] * D)))
        assert len(pb.SearchResponse.FromString(raw(good.SerializeToString(), timeout=5)).result.hits) == 10
    assert client.health() == "SERVING"


def test_queued_calls_without_a_deadline_are_answered():
    server = start_server(slow_searcher(0.05), loopback(), warmup=False)
    try:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.SearcherStub(ch)
            req = pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[1.0] * D)))
            futs = [stub.Search.future(req) for _ in range(6)]  # no timeout: no deadline on the wire
            assert all(len(f.result().result.hits) == 10 for f in futs)  # at most one was searched inline
    finally:
        server.stop(0)
