"""The gRPC searcher service (`elias.v1.Searcher`): a thin adapter from messages to `Searcher` calls.

`SearchServer` adds what gRPC users expect around it: the standard health service (NOT_SERVING until
the index is loaded and warmed), server reflection, a maximum message size, a concurrency limit (calls
past it get RESOURCE_EXHAUSTED at once), deadlines (a query whose deadline passed is not searched),
dynamic batching of concurrent `Search` calls (batching.py), and graceful shutdown (`serve` stops on
SIGTERM/SIGINT; calls in flight finish within the grace period).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from elias_retrieval.batching import BatcherClosed, DeadlineExpired, DynamicBatcher
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc
from elias_retrieval.searcher import Query, QueryError, Searcher, SearchParams, SearchResults

log = logging.getLogger("elias.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Searcher"].full_name  # "elias.v1.Searcher"


@dataclass
class ServerConfig:
    """How `elias serve` runs (every default in one place)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = an ephemeral port
    max_concurrent_rpcs: int = 64  # calls past this get RESOURCE_EXHAUSTED (no unbounded queue)
    max_message_bytes: int = 4 << 20
    batching: bool = True
    max_batch: int = 64
    max_wait_us: int = 500
    grace_s: float = 10.0  # shutdown: how long calls in flight may take to finish


# ----- messages <-> library -----


def query_from_proto(q: pb.Query, prefix: str = "query") -> Query:
    """A proto Query as a searcher Query (not yet checked); QueryError when no kind is set."""
    kind = q.WhichOneof("kind")
    if kind == "text":
        return Query(text=q.text)
    if kind == "sparse":
        return Query(sparse=(np.asarray(q.sparse.indices, dtype=np.int64), np.asarray(q.sparse.values, np.float32)))
    if kind == "embedding":
        return Query(embedding=np.asarray(q.embedding.values, dtype=np.float32))
    raise QueryError(prefix, "no query given (set one of text, sparse or embedding)")


def params_from_proto(searcher: Searcher, p: pb.SearchParams) -> SearchParams:
    def opt(name: str) -> int | None:
        return getattr(p, name) if p.HasField(name) else None

    rerank = p.rerank if p.HasField("rerank") else True
    return searcher.resolve_params(opt("k"), opt("beam_size"), opt("shortlist_size"), p.explain, rerank=rerank)


def result_to_proto(res: SearchResults, row: int) -> pb.SearchResult:
    out = pb.SearchResult(method=res.methods[row] if res.methods else "ELIAS")
    n = len(res.label_ids[row])
    ids, scores = res.ids[row, :n].tolist(), res.scores[row, :n].tolist()  # Python scalars: 3x faster to copy
    add = out.hits.add  # built in place: extending by ready-made Hit messages would copy each one
    hits = [add(index=i, label_id=lid, name=name, score=sc)
            for i, lid, name, sc in zip(ids, res.label_ids[row], res.label_names[row], scores, strict=True)]
    if res.cluster is not None:
        for hit, c, p, q in zip(hits, res.cluster[row, :n].tolist(), res.path[row, :n].tolist(),  # type: ignore[index]
                                res.label_prob[row, :n].tolist(), strict=True):  # type: ignore[index]
            hit.explanation.cluster, hit.explanation.path_score, hit.explanation.label_score = c, p, q
    return out


def info_to_proto(s: Searcher) -> pb.IndexInfo:
    i = s.info
    return pb.IndexInfo(
        index_version=i.index_version, num_labels=i.num_labels, num_clusters=i.num_clusters, kappa=i.kappa,
        dim=i.dim, encoder=i.encoder, num_features=i.num_features, query_kinds=i.query_kinds,
        defaults=pb.SearchDefaults(**i.defaults), max_k=i.max_k, max_shortlist_size=i.max_shortlist_size,
        max_batch_queries=i.max_batch_queries, label_weights_dtype=i.label_weights_dtype, device=i.device,
        reranker=i.reranker,
    )


class _Status(Exception):
    """A call's failure as a gRPC status (raised inside the servicer, turned into `context.abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SearcherServicer(pb_grpc.SearcherServicer):
    """Parse, call the searcher (through the batcher when there is one), format. No search logic here."""

    def __init__(self) -> None:
        self.searcher: Searcher | None = None
        self.batcher: DynamicBatcher | None = None

    def _ready(self, context: grpc.ServicerContext) -> Searcher:
        if self.searcher is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the index is still loading")
        return self.searcher  # type: ignore[return-value]

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        searcher = self._ready(context)
        try:
            res = self._search_one(searcher, request, context)
        except _Status as s:
            context.abort(s.code, s.message)
        return pb.SearchResponse(result=result_to_proto(res, 0), index_version=searcher.index_version)

    def _search_one(self, searcher: Searcher, request: pb.SearchRequest,
                    context: grpc.ServicerContext) -> SearchResults:
        batcher = self.batcher
        if batcher is not None:
            batcher.arrive()  # the batcher may wait for this query while it is parsed
        submitted = False
        try:
            query = searcher.check_query(query_from_proto(request.query), "query")
            params = params_from_proto(searcher, request.params)
            remaining = context.time_remaining()
            if batcher is None:
                submitted = True
                return searcher.search_checked([query], params)
            if batcher.try_inline():  # alone: search in this thread, no hand-off
                submitted = True
                try:
                    return searcher.search_checked([query], params)
                finally:
                    batcher.inline_done()
            deadline = None if remaining is None else time.monotonic() + remaining
            fut = batcher.submit(query, params, deadline, announced=True)
            submitted = True
            context.add_callback(fut.cancel)
            try:
                return fut.result(timeout=remaining)
            except (TimeoutError, futures.TimeoutError, DeadlineExpired):
                fut.cancel()
                msg = "deadline exceeded before the search finished"
                raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED, msg) from None
            except futures.CancelledError:
                raise _Status(grpc.StatusCode.CANCELLED, "cancelled") from None
        except QueryError as e:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except BatcherClosed:
            raise _Status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down") from None
        except _Status:
            raise
        except Exception as e:
            log.exception("search failed")
            raise _Status(grpc.StatusCode.INTERNAL, f"search failed: {type(e).__name__}: {e}") from None
        finally:
            if batcher is not None and not submitted:
                batcher.depart()

    def SearchBatch(self, request: pb.SearchBatchRequest, context: grpc.ServicerContext) -> pb.SearchBatchResponse:
        searcher = self._ready(context)
        try:
            res = self._search_batch(searcher, request, context)
        except _Status as s:
            context.abort(s.code, s.message)
        return pb.SearchBatchResponse(results=[result_to_proto(res, i) for i in range(len(res))],
                                      index_version=searcher.index_version)

    def _search_batch(self, searcher: Searcher, request: pb.SearchBatchRequest,
                      context: grpc.ServicerContext) -> SearchResults:
        try:
            n = len(request.queries)
            if n == 0:
                raise QueryError("queries", "is empty")
            if n > searcher.info.max_batch_queries:
                raise QueryError("queries", f"has {n} queries, at most {searcher.info.max_batch_queries}")
            queries = [searcher.check_query(query_from_proto(q, f"queries[{i}]"), f"queries[{i}]")
                       for i, q in enumerate(request.queries)]
            params = params_from_proto(searcher, request.params)
        except QueryError as e:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the search started")
        try:
            return searcher.search_checked(queries, params)
        except Exception as e:
            log.exception("batch search failed")
            raise _Status(grpc.StatusCode.INTERNAL, f"search failed: {type(e).__name__}: {e}") from None

    def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.ServicerContext) -> pb.IndexInfo:
        return info_to_proto(self._ready(context))


class SearchServer:
    """A grpcio server for one Searcher: `start()` (NOT_SERVING), `attach(searcher)` (SERVING), `stop()`."""

    def __init__(self, cfg: ServerConfig | None = None):
        self.cfg = cfg or ServerConfig()
        c = self.cfg
        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        # One worker per admitted call: a call waits on its batch in its own thread.
        self._executor = futures.ThreadPoolExecutor(max_workers=c.max_concurrent_rpcs + 4,
                                                    thread_name_prefix="elias-rpc")
        self.server = grpc.server(self._executor, options=options, maximum_concurrent_rpcs=c.max_concurrent_rpcs)
        self.servicer = SearcherServicer()
        pb_grpc.add_SearcherServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self._stopped = threading.Event()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> int:
        """Bind and start answering (health NOT_SERVING until `attach`); return the bound port."""
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        self.port = self.server.add_insecure_port(f"{host}:{self.cfg.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.cfg.host}:{self.cfg.port}")
        self.server.start()
        return self.port

    def attach(self, searcher: Searcher, warmup: bool = True) -> None:
        """Serve `searcher`: warm it up, start the batcher, then report SERVING."""
        if warmup:
            searcher.warmup()
        if self.cfg.batching:
            self.servicer.batcher = DynamicBatcher(searcher, self.cfg.max_batch, self.cfg.max_wait_us)
        self.servicer.searcher = searcher
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let calls in flight finish (up to `grace` s)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.cfg.grace_s if grace is None else grace).wait()
        if self.servicer.batcher is not None:
            self.servicer.batcher.close()
        self._executor.shutdown(wait=False)

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def start_server(searcher: Searcher, cfg: ServerConfig | None = None, warmup: bool = True) -> SearchServer:
    """Start a server for an already loaded searcher (tests, benchmarks)."""
    server = SearchServer(cfg)
    server.start()
    try:
        server.attach(searcher, warmup=warmup)
    except BaseException:
        server.stop(0)
        raise
    return server


def serve(index_dir: str | Path, cfg: ServerConfig, device: str = "auto",
          on_ready: Callable[[SearchServer, Searcher], None] | None = None) -> None:
    """`elias serve`: listen, load and warm the index, serve until SIGTERM/SIGINT, then stop gracefully."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = SearchServer(cfg)
    try:
        server.start()
        log.info("listening on %s (NOT_SERVING while the index loads)", server.address)
        searcher = Searcher.open(index_dir, device=device)
        server.attach(searcher)
        log.info("serving %s (version %s) on %s", index_dir, searcher.index_version or "-", server.address)
        if on_ready is not None:
            on_ready(server, searcher)
        stop.wait()
        log.info("shutting down: letting calls in flight finish (up to %.0f s)", cfg.grace_s)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
