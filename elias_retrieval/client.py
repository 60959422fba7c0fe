"""A small Python client for the `elias.v1.Searcher` service; results come back as `SearchResults`.

    with SearchClient("127.0.0.1:50051") as c:
        res = c.search(text="common organisation of the market in wine", k=10)
        res.label_names[0], res.scores[0], c.last_index_version

    with SearchClient("search.internal:50051", tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key") as c:
        ...  # TLS; the client certificate only for a server that asks for one (mutual TLS)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elias_retrieval.proto.elias.v1 import admin_pb2, admin_pb2_grpc
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc
from elias_retrieval.searcher import LabelStrings, Query, SearchResults
from elias_retrieval.tls import channel_credentials


def query_to_proto(q: Query) -> pb.Query:
    if q.text is not None:
        return pb.Query(text=q.text)
    if q.sparse is not None:
        idx, val = q.sparse
        return pb.Query(sparse=pb.SparseFeatures(indices=[int(i) for i in np.asarray(idx).reshape(-1)],
                                                 values=np.asarray(val, np.float32).reshape(-1).tolist()))
    if q.embedding is not None:
        return pb.Query(embedding=pb.DenseEmbedding(values=np.asarray(q.embedding, np.float32).reshape(-1).tolist()))
    return pb.Query()


def params_to_proto(k: int | None, beam_size: int | None, shortlist_size: int | None, explain: bool,
                    rerank: bool = True) -> pb.SearchParams:
    p = pb.SearchParams(explain=explain)
    if not rerank:
        p.rerank = False
    for name, v in (("k", k), ("beam_size", beam_size), ("shortlist_size", shortlist_size)):
        if v is not None:
            setattr(p, name, v)
    return p


def results_from_proto(results: Sequence[pb.SearchResult]) -> SearchResults:
    """Proto results as SearchResults (rows padded with -1 / 0 to the longest)."""
    k = max((len(r.hits) for r in results), default=0)
    B = len(results)
    ids = np.full((B, k), -1, dtype=np.int64)
    scores = np.zeros((B, k), dtype=np.float32)
    explain = any(h.HasField("explanation") for r in results for h in r.hits)
    cluster = np.full((B, k), -1, dtype=np.int64) if explain else None
    path = np.zeros((B, k), dtype=np.float32) if explain else None
    prob = np.zeros((B, k), dtype=np.float32) if explain else None
    for i, r in enumerate(results):
        for j, h in enumerate(r.hits):
            ids[i, j], scores[i, j] = h.index, h.score
            if explain:
                cluster[i, j] = h.explanation.cluster  # type: ignore[index]
                path[i, j] = h.explanation.path_score  # type: ignore[index]
                prob[i, j] = h.explanation.label_score  # type: ignore[index]
    hits = [h for r in results for h in r.hits]
    labels = LabelStrings({h.index: h.label_id for h in hits}, {h.index: h.name for h in hits})
    return SearchResults(ids, scores, labels, cluster, path, prob, [r.method or "ELIAS" for r in results])


class SearchClient:
    """Blocking client over one channel. Errors are `grpc.RpcError` with the server's status and message.

    TLS when `tls_ca` (the PEM CA that signed the server's certificate) or a client certificate is given: with
    `tls_cert` and `tls_key` for a server that wants one (mutual TLS), and without `tls_ca` the system's roots.
    """

    def __init__(self, target: str, timeout: float | None = 30.0, max_message_bytes: int = 4 << 20,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None):
        self.target = target
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_ca is not None or tls_cert is not None or tls_key is not None:
            creds = channel_credentials(tls_ca, tls_cert, tls_key)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.SearcherStub(self.channel)
        self.last_index_version = ""

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (not until the index is loaded: see `health`)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of `service` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def info(self, timeout: float | None = None) -> pb.IndexInfo:
        return self.stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=timeout or self.timeout)

    def search(
        self, text: str | None = None, sparse: tuple[Any, Any] | None = None, embedding: Any = None,
        k: int | None = None, beam_size: int | None = None, shortlist_size: int | None = None,
        explain: bool = False, timeout: float | None = None, rerank: bool = True,
    ) -> SearchResults:
        """One query (give exactly one of text, sparse=(indices, values), embedding); a one-row result."""
        req = pb.SearchRequest(query=query_to_proto(Query(text=text, sparse=sparse, embedding=embedding)),
                               params=params_to_proto(k, beam_size, shortlist_size, explain, rerank))
        resp = self.stub.Search(req, timeout=timeout or self.timeout)
        self.last_index_version = resp.index_version
        return results_from_proto([resp.result])

    def search_batch(
        self, queries: Sequence[Query], k: int | None = None, beam_size: int | None = None,
        shortlist_size: int | None = None, explain: bool = False, timeout: float | None = None,
        rerank: bool = True,
    ) -> SearchResults:
        """Several queries with shared parameters, in one call."""
        req = pb.SearchBatchRequest(queries=[query_to_proto(q) for q in queries],
                                    params=params_to_proto(k, beam_size, shortlist_size, explain, rerank))
        resp = self.stub.SearchBatch(req, timeout=timeout or self.timeout)
        self.last_index_version = resp.index_version
        return results_from_proto(resp.results)

    def reload_index(self, path: str | None = None, timeout: float | None = None) -> admin_pb2.ReloadIndexResponse:
        """elias.v1.Admin/ReloadIndex (a server started with --admin): swap in the index at `path` on the server
        (default: its INDEX_DIR, resolved again); FAILED_PRECONDITION when refused, ABORTED during another reload."""
        req = admin_pb2.ReloadIndexRequest() if path is None else admin_pb2.ReloadIndexRequest(path=path)
        return admin_pb2_grpc.AdminStub(self.channel).ReloadIndex(req, timeout=timeout or self.timeout)
