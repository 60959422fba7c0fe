"""wire.ResponseEncoder: the bytes it writes decode, with the generated classes, to the messages the plain
path (`wire.result_to_proto`) builds, in process and through a served index before and after a swap."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from test_searcher import C, D, random_tensors

from elias_retrieval import wire
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc
from elias_retrieval.searcher import LabelStrings, Searcher, SearchResults
from elias_retrieval.server import ServerConfig, start_server
from elias_retrieval.wire import HitHeads, ResponseEncoder, result_to_proto

L = 300


def labels(prefix: str) -> SimpleNamespace:
    """Unicode ids, names empty ("" or None), short, and over 127 bytes (two-byte lengths)."""
    names = [None if i % 5 == 0 else "" if i % 5 == 1 else f"ñame {i} 名前" * (1 + 20 * (i % 5 == 2)) for i in range(L)]
    return SimpleNamespace(ids=[f"{prefix}-ラベル-{i}" for i in range(L)], names=names)


def searcher(prefix: str = "v1", seed: int = 0) -> Searcher:
    info = {"index_version": prefix, "defaults": {"k": 10, "beam_size": 4, "shortlist_size": 50}}
    return Searcher(random_tensors(seed=seed), None, labels(prefix), info, device="cpu")


def queries(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def plain_response(res: SearchResults, version: str) -> pb.SearchResponse:
    return pb.SearchResponse(result=result_to_proto(res, 0), index_version=version)


def plain_batch(res: SearchResults, version: str) -> pb.SearchBatchResponse:
    return pb.SearchBatchResponse(results=[result_to_proto(res, i) for i in range(len(res))], index_version=version)


def assert_encodes_as_plain(enc: ResponseEncoder, res: SearchResults, version: str = "v1") -> None:
    for i in range(len(res)):
        row = res.rows(i, i + 1)
        data = enc.search_response(row, version).SerializeToString()
        assert pb.SearchResponse.FromString(data) == plain_response(row, version)
        assert data == plain_response(row, version).SerializeToString()  # today's upb writes the very same bytes
    data = enc.batch_response(res, version).data
    assert pb.SearchBatchResponse.FromString(data) == plain_batch(res, version)
    assert data == plain_batch(res, version).SerializeToString()


def encoder(s: Searcher) -> ResponseEncoder:
    return ResponseEncoder(HitHeads(s.labels, s.info.num_labels))


@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("k, beam", [(10, 4), (100, 1)])  # beam 1: fewer than k labels reachable
def test_encoded_responses_equal_the_plain_messages(explain: bool, k: int, beam: int):
    s = searcher()
    enc = encoder(s)
    res = s.search_embeddings(queries(), k=k, beam_size=beam, shortlist_size=100, explain=explain)
    if k == 100:
        assert (res.ids < 0).any()
    assert_encodes_as_plain(enc, res)
    res.methods = ["ELIAS++", "ELIAS"] * 3
    assert_encodes_as_plain(enc, res, version="")
    assert_encodes_as_plain(ResponseEncoder(), res)  # no heads: the reference


def test_zero_and_negative_zero_scores_index_0_empty_strings_and_negative_clusters(
        monkeypatch: pytest.MonkeyPatch):
    ids = np.array([[0, 1, 2, 3, -1, -1]])
    scores = np.array([[0.0, -0.0, 1.5, np.float32(1e-40), 0.0, 0.0]], dtype=np.float32)
    strings = LabelStrings(["", "é", "x" * 200, "d"], ["", "", "名" * 50, "n"])
    enc = ResponseEncoder(HitHeads(strings, 4))
    assert_encodes_as_plain(enc, SearchResults(ids, scores, strings))  # +0.0 is left out: the reference
    explained = SearchResults(ids, scores, strings, cluster=np.array([[0, -1, 2**31 - 1, 3, -1, -1]]),
                              path=np.array([[0.0, -0.0, 0.5, 1.0, 0, 0]], np.float32),
                              label_prob=np.array([[0.0, 1.0, 0.5, 0.0, 0, 0]], np.float32))
    assert_encodes_as_plain(enc, explained)
    empty = SearchResults(np.full((2, 3), -1), np.zeros((2, 3), np.float32), strings)
    assert_encodes_as_plain(enc, empty)
    negative_zero = SearchResults(ids, np.array([[-0.0, 1.5, 1e-40, 2.0, 0, 0]], np.float32), strings)
    expected = [result_to_proto(r, 0).SerializeToString() for r in (negative_zero, empty)]
    monkeypatch.setattr(wire, "result_to_proto", None)  # no +0.0 score: written from the heads alone
    assert [enc.result(negative_zero, 0), enc.result(empty, 0)] == expected


def test_dense_ids_without_label_tables_are_written_from_the_heads(monkeypatch: pytest.MonkeyPatch):
    ids = np.array([[0, 5, 127, 128, 16_384, 299_999]])
    scores = np.linspace(2.0, 0.5, 6, dtype=np.float32)[None]
    res = SearchResults(ids, scores)  # no label tables: dense ids as ids, empty names
    enc = ResponseEncoder(HitHeads(res.labels, 300_000))
    expected = result_to_proto(res, 0).SerializeToString()
    monkeypatch.setattr(wire, "result_to_proto", None)
    assert enc.result(res, 0) == expected


def test_results_of_another_index_are_the_references_bytes(monkeypatch: pytest.MonkeyPatch):
    one, two = searcher("v1"), searcher("v2")  # the same tensors and hits, other label strings
    enc = encoder(one)
    res = two.search_embeddings(queries(), k=20, beam_size=C)
    assert_encodes_as_plain(enc, res, two.index_version)
    monkeypatch.setattr(wire, "result_to_proto", None)
    with pytest.raises(TypeError):
        enc.result(res, 0)  # not its labels: the reference's turn
    assert enc.result(one.search_embeddings(queries(), k=20, beam_size=C), 0)  # its own: the heads


def test_heads_need_whole_label_tables():
    with pytest.raises(TypeError, match="whole vocabulary"):
        HitHeads(LabelStrings({3: "a"}, {3: ""}), 4)


def test_served_search_and_batch_decode_to_the_plain_messages_before_and_after_a_swap():
    first, second = searcher("v1", seed=0), searcher("v2", seed=1)
    server = start_server(first, ServerConfig(host="127.0.0.1", port=0))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.SearcherStub(channel)
            for s in (first, second, first):
                if s is not server.servicer.searcher:
                    server.attach(s, warmup=False)
                q = queries(seed=7)
                for explain in (False, True):
                    params = pb.SearchParams(k=30, beam_size=2, explain=explain)
                    for e in q:
                        got = stub.Search(pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(
                            values=e.tolist())), params=params), timeout=10)
                        local = s.search_embeddings(e[None], k=30, beam_size=2, explain=explain)
                        assert got == plain_response(local, s.index_version)
                    got_batch = stub.SearchBatch(pb.SearchBatchRequest(queries=[pb.Query(
                        embedding=pb.DenseEmbedding(values=e.tolist())) for e in q], params=params), timeout=10)
                    local = s.search_embeddings(q, k=30, beam_size=2, explain=explain)
                    assert got_batch == plain_batch(local, s.index_version)
                heads = server.servicer._served.encoder.heads
                assert heads is not None and heads.labels is s.labels
    finally:
        server.stop(0)
