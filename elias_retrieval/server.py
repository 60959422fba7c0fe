"""The gRPC searcher service (`elias.v1.Searcher`): a thin adapter from messages to `Searcher` calls.

`SearchServer` adds what gRPC users expect around it: the standard health service (NOT_SERVING until
the index is loaded and warmed), server reflection, a maximum message size, a concurrency limit (calls
past it get RESOURCE_EXHAUSTED at once), deadlines (a query whose deadline passed is not searched),
dynamic batching of concurrent `Search` calls (batching.py), and graceful shutdown (`serve` stops on
SIGTERM/SIGINT; calls in flight finish within the grace period).

Hot index swap (index_swap.py): `serve` reloads on SIGHUP, and `elias.v1.Admin/ReloadIndex` (only with
`ServerConfig.admin`) does the same on request. The new index is loaded, verified and warmed beside the old
one; then calls switch to it at once (each call searches the index, and its batcher, that it started on), and
the old one's batcher is closed once its calls in flight have finished. Reloads run one at a time: SIGHUPs
that arrive during a reload make one more reload after it; an admin call during a reload gets ABORTED. A
refused reload (missing, corrupt, truncated or incompatible index) is logged and changes nothing.

TLS and mutual TLS (tls.py) come from `ServerConfig.tls_*`; request metrics on a Prometheus endpoint and JSON
access logs (observability.py, a gRPC interceptor) from `metrics_port` and `access_log`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from elias_retrieval.batching import BatcherClosed, DeadlineExpired, DynamicBatcher
from elias_retrieval.index_swap import (
    ADMIN_SERVICE_NAME,
    AdminServicer,
    NotServing,
    SwapBusy,
    SwapRefused,
    SwapResult,
    load_for_serving,
)
from elias_retrieval.malloc import return_freed_memory
from elias_retrieval.observability import Observability
from elias_retrieval.proto.elias.v1 import admin_pb2_grpc
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc
from elias_retrieval.searcher import Query, QueryError, Searcher, SearchParams, SearchResults
from elias_retrieval.tls import server_tls
from elias_retrieval.wire import Encoded, HitHeads, ResponseEncoder, result_to_proto  # noqa: F401 - the reference

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
    admin: bool = False  # serve elias.v1.Admin (ReloadIndex)
    tls_cert: Path | None = None  # PEM certificate chain: with tls_key, serve TLS instead of plaintext (tls.py)
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed (mutual TLS)
    metrics_port: int | None = None  # Prometheus /metrics on `host` (observability.py); None = off, 0 = any port
    access_log: bool = False  # one JSON line per call on the `elias.access` logger


# ----- messages <-> library (results -> response bytes: wire.py) -----


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


def info_to_proto(s: Searcher) -> pb.IndexInfo:
    i = s.info
    return pb.IndexInfo(
        index_version=i.index_version, num_labels=i.num_labels, num_clusters=i.num_clusters, kappa=i.kappa,
        dim=i.dim, encoder=i.encoder, num_features=i.num_features, query_kinds=i.query_kinds,
        defaults=pb.SearchDefaults(**i.defaults), max_k=i.max_k, max_shortlist_size=i.max_shortlist_size,
        max_batch_queries=i.max_batch_queries, label_weights_dtype=i.label_weights_dtype, device=i.device,
        reranker=i.reranker,
    )


_NO_DEADLINE_S = 365 * 86400.0


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when the client set none (grpc then reports a huge
    number, which no wait accepts as a timeout)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


class _Status(Exception):
    """A call's failure as a gRPC status (raised inside the servicer, turned into `context.abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(eq=False)
class _Served:
    """One served index: its searcher, its batcher, its responses' encoder (every label's hit fields made
    beforehand), and how many calls are using them."""

    searcher: Searcher
    batcher: DynamicBatcher | None
    encoder: ResponseEncoder = field(default_factory=ResponseEncoder)
    calls: int = 0


class SearcherServicer(pb_grpc.SearcherServicer):
    """Parse, call the searcher (through the batcher when there is one), format. No search logic here.

    `searcher` and `batcher` are the index served now; each call takes both at once (`_enter`) and keeps them
    to its end, so a swap (`switch`) never splits a call between two indexes.
    """

    def __init__(self) -> None:
        self.searcher: Searcher | None = None
        self.batcher: DynamicBatcher | None = None
        self._served: _Served | None = None
        self._calls = threading.Condition()

    def _enter(self, context: grpc.ServicerContext) -> _Served:
        with self._calls:
            served = self._served
            if served is not None:
                served.calls += 1
        if served is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the index is still loading")
        return served  # type: ignore[return-value]

    def _leave(self, served: _Served) -> None:
        with self._calls:
            served.calls -= 1
            if served.calls == 0:
                self._calls.notify_all()

    def switch(self, searcher: Searcher, batcher: DynamicBatcher | None,
               encoder: ResponseEncoder | None = None) -> _Served | None:
        """Send new calls to `searcher` (and `batcher`, their responses written by `encoder`); return what was
        served before (None at first)."""
        with self._calls:
            old, self._served = self._served, _Served(searcher, batcher, encoder or ResponseEncoder())
            self.searcher, self.batcher = searcher, batcher
        return old

    def drain(self, served: _Served, timeout: float | None) -> bool:
        """Wait until no call uses `served` (True), or `timeout` s passed (False)."""
        with self._calls:
            return self._calls.wait_for(lambda: served.calls == 0, timeout)

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> Encoded:
        served = self._enter(context)
        try:
            res = self._search_one(served.searcher, served.batcher, request, context)
        except _Status as s:
            context.abort(s.code, s.message)
        finally:
            self._leave(served)
        return served.encoder.search_response(res, served.searcher.index_version)

    def _search_one(self, searcher: Searcher, batcher: DynamicBatcher | None, request: pb.SearchRequest,
                    context: grpc.ServicerContext) -> SearchResults:
        if batcher is not None:
            batcher.arrive()  # the batcher may wait for this query while it is parsed
        submitted = False
        try:
            query = searcher.check_query(query_from_proto(request.query), "query")
            params = params_from_proto(searcher, request.params)
            remaining = time_remaining(context)
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

    def SearchBatch(self, request: pb.SearchBatchRequest, context: grpc.ServicerContext) -> Encoded:
        served = self._enter(context)
        try:
            res = self._search_batch(served.searcher, request, context)
        except _Status as s:
            context.abort(s.code, s.message)
        finally:
            self._leave(served)
        return served.encoder.batch_response(res, served.searcher.index_version)

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
        remaining = time_remaining(context)
        if remaining is not None and remaining <= 0:
            raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the search started")
        try:
            return searcher.search_checked(queries, params)
        except Exception as e:
            log.exception("batch search failed")
            raise _Status(grpc.StatusCode.INTERNAL, f"search failed: {type(e).__name__}: {e}") from None

    def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.ServicerContext) -> pb.IndexInfo:
        served = self._enter(context)
        self._leave(served)
        return info_to_proto(served.searcher)


class _Undecodable:
    """A request body that does not parse as its message (answered INVALID_ARGUMENT; grpcio would say INTERNAL)."""

    def __init__(self, error: str):
        self.error = error


def add_searcher_servicer(servicer: SearcherServicer, server: grpc.Server) -> None:
    """Register `servicer` as the generated `add_SearcherServicer_to_server` does, except that a request whose
    bytes are not a valid message (or hold invalid UTF-8 in a string) gets INVALID_ARGUMENT, not INTERNAL, and
    that Search and SearchBatch return their responses already serialized (`wire.Encoded`: the same bytes)."""
    def parser(message: type) -> Callable[[bytes], object]:
        def parse(data: bytes) -> object:
            try:
                return message.FromString(data)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - any parse failure is the client's bytes
                return _Undecodable(f"{type(e).__name__}: {e}")
        return parse

    def refusing_undecodable(method: Callable, name: str) -> Callable:
        def call(request: object, context: grpc.ServicerContext) -> object:
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {name} ({request.error})")
            return method(request, context)
        return call

    def serialize(response: Encoded | pb.IndexInfo) -> bytes:
        return response.SerializeToString()

    requests = {"Search": pb.SearchRequest, "SearchBatch": pb.SearchBatchRequest,
                "GetIndexInfo": pb.GetIndexInfoRequest}
    handlers = {
        rpc: grpc.unary_unary_rpc_method_handler(
            refusing_undecodable(getattr(servicer, rpc), req.DESCRIPTOR.full_name),
            request_deserializer=parser(req), response_serializer=serialize)
        for rpc, req in requests.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class SearchServer:
    """A grpcio server for one Searcher: `start()` (NOT_SERVING), `attach(searcher)` (SERVING), `stop()`;
    `reload()` swaps in the index at `index_path` (or another) while serving."""

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
        self.observability = Observability(self, c.metrics_port is not None, c.access_log) \
            if c.metrics_port is not None or c.access_log else None
        interceptors = [self.observability.interceptor] if self.observability is not None else []
        self.server = grpc.server(self._executor, options=options, maximum_concurrent_rpcs=c.max_concurrent_rpcs,
                                  interceptors=interceptors)
        self.servicer = SearcherServicer()
        add_searcher_servicer(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if c.admin:
            admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self), self.server)
            services.append(ADMIN_SERVICE_NAME)
        reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), self.server)
        self.index_path: Path | None = None  # what `reload()` resolves again (serve() sets it)
        self.device = "auto"
        self.index_load_seconds = 0.0  # open (+ verify) + warm-up of the index served now
        self._reloading = threading.Lock()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.metrics_port = 0  # the Prometheus endpoint's port once started (cfg.metrics_port)
        self._stopped = threading.Event()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> int:
        """Bind and start answering (health NOT_SERVING until `attach`); return the bound port."""
        c = self.cfg
        host = f"[{c.host}]" if ":" in c.host else c.host
        creds = server_tls(c.tls_cert, c.tls_key, c.tls_client_ca)
        if creds is not None:
            self.port = self.server.add_secure_port(f"{host}:{c.port}", creds)
        else:
            self.port = self.server.add_insecure_port(f"{host}:{c.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {c.host}:{c.port}")
        self.server.start()
        if self.observability is not None and c.metrics_port is not None:
            try:
                self.metrics_port = self.observability.start(c.host, c.metrics_port)
            except BaseException:
                self.server.stop(0)
                raise
        return self.port

    def attach(self, searcher: Searcher, warmup: bool = True) -> None:
        """Serve `searcher`: warm it up, start its batcher, switch calls to it and report SERVING; then release
        the index served before, if any, once its calls in flight finished (its batcher closed)."""
        if warmup:
            searcher.warmup()
        encoder = ResponseEncoder(HitHeads(searcher.labels, searcher.info.num_labels))
        on_batch = self.observability.on_batch if self.observability is not None else None
        batcher = DynamicBatcher(searcher, self.cfg.max_batch, self.cfg.max_wait_us, on_batch) \
            if self.cfg.batching else None
        old = self.servicer.switch(searcher, batcher, encoder)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if old is not None:
            if not self.servicer.drain(old, self.cfg.grace_s):
                log.warning("index %s: calls still in flight after %.0f s; closing its batcher anyway",
                            old.searcher.index_version or "-", self.cfg.grace_s)
            if old.batcher is not None:
                old.batcher.close()

    def reload(self, path: str | Path | None = None, wait: bool = False) -> SwapResult:
        """Swap in the index at `path` (default `index_path`, resolved again; a given path becomes `index_path`).

        The new index is verified, checked against the served one and warmed while the old one serves
        (index_swap.load_for_serving), then `attach`ed. One reload at a time: SwapBusy when another is running
        (unless `wait`); SwapRefused (logged, nothing changed) when the new index cannot serve.
        """
        if not self._reloading.acquire(blocking=wait):
            raise SwapBusy("another index reload is running; try again when it has finished")
        try:
            served = self.servicer.searcher
            target = path if path is not None else self.index_path
            if served is None or target is None:
                raise NotServing("no index is served yet")
            t0 = time.perf_counter()
            try:
                searcher, real = load_for_serving(target, self.device, served)
            except SwapRefused as e:
                log.error("reload refused, still serving version %s: %s", served.index_version or "-", e)
                raise
            loaded = time.perf_counter()
            self.attach(searcher, warmup=False)
            self.index_load_seconds = loaded - t0
            if path is not None:
                self.index_path = Path(path)
            result = SwapResult(searcher.index_version, served.index_version, real, loaded - t0,
                                time.perf_counter() - loaded)
            log.info("swapped index %s -> %s (%s): loaded, verified and warmed in %.2f s, old index released "
                     "in %.3f s", result.previous_version or "-", result.index_version or "-", real,
                     result.load_seconds, result.switch_seconds)
            return result
        finally:
            self._reloading.release()

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let calls in flight finish (up to `grace` s)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.cfg.grace_s if grace is None else grace).wait()
        if self.servicer.batcher is not None:
            self.servicer.batcher.close()
        if self.observability is not None:
            self.observability.stop()
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
    """`elias serve`: listen, load and warm the index, serve until SIGTERM/SIGINT, then stop gracefully.

    `index_dir` may be a symlink: SIGHUP resolves it again and swaps in what it names (`SearchServer.reload`).
    """
    return_freed_memory()  # before the index and the first requests are allocated
    stop, hup = threading.Event(), threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    if hasattr(signal, "SIGHUP"):
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: hup.set())
    server = SearchServer(cfg)
    server.index_path, server.device = Path(index_dir), device
    try:
        server.start()
        log.info("listening on %s (NOT_SERVING while the index loads)", server.address)
        t0 = time.perf_counter()
        real = Path(index_dir).resolve()
        searcher = Searcher.open(real, device=device)
        server.attach(searcher)
        server.index_load_seconds = time.perf_counter() - t0
        log.info("serving %s (version %s) on %s; SIGHUP reloads %s", real, searcher.index_version or "-",
                 server.address, index_dir)
        threading.Thread(target=_reload_on_hup, args=(server, hup, stop), name="elias-reload", daemon=True).start()
        if on_ready is not None:
            on_ready(server, searcher)
        stop.wait()
        log.info("shutting down: letting calls in flight finish (up to %.0f s)", cfg.grace_s)
    finally:
        stop.set()
        hup.set()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reload_on_hup(server: SearchServer, hup: threading.Event, stop: threading.Event) -> None:
    """Reload each time `hup` is set (SIGHUPs during a reload make one more reload after it) until `stop`."""
    while True:
        hup.wait()
        if stop.is_set():
            return
        hup.clear()
        try:
            server.reload(wait=True)
        except (SwapRefused, NotServing):
            pass  # logged by reload(); the served index is unchanged
        except Exception:
            log.exception("reload failed; the served index is unchanged")
