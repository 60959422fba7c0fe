"""Metrics and access logs for `SearchServer`: a gRPC interceptor, a Prometheus endpoint, JSON access log lines.

Prometheus metrics (each server has its own registry, so several servers in one process do not clash):

    grpc_server_handled_total{grpc_service, grpc_method, grpc_code}   calls finished, by status code
    grpc_server_handling_seconds{grpc_service, grpc_method}          latency histogram (100 us .. 10 s)
    elias_rpc_in_flight                                               calls being served now (the queue depth)
    elias_rpc_max_concurrent                                          the limit past which calls get RESOURCE_EXHAUSTED
    elias_batch_size{route}                                           queries per search: "batched" by the dynamic
                                                                      batcher's worker, or "inline" (a lone caller)
    elias_index_info{index_version}                                   1 for the index being served
    elias_index_load_seconds                                          how long that index took to load
    process_*, python_*                                               the process's CPU, memory, file descriptors, GC

Unary methods of every service are counted (health checks included); streaming ones (reflection, health Watch)
are passed through. The index metrics are read at scrape time from the server, so a swapped index shows at once.
Calls refused past the concurrency limit are counted as RESOURCE_EXHAUSTED (no latency: they never ran); requests
over the message size limit are refused by grpc before any handler runs and are not seen here.

The access log (`elias.access` logger, INFO) has one JSON object per call of the elias services:
{"ts", "method", "code", "ms", "peer", "queries", "index_version"} (+ "error", the status message, when not OK).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

if TYPE_CHECKING:
    from elias_retrieval.server import SearchServer

ACCESS_LOGGER = "elias.access"
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

access_log = logging.getLogger(ACCESS_LOGGER)


def log_access_to(stream: IO[str]) -> None:
    """Write the access log to `stream` as bare JSON lines (not through the root logger's format)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


class ServerMetrics:
    """The Prometheus metrics of one server, in their own registry."""

    def __init__(self, server: SearchServer):
        self.registry = CollectorRegistry()
        r = self.registry
        self.handled = Counter("grpc_server_handled", "gRPC calls finished, by method and status code.",
                               ["grpc_service", "grpc_method", "grpc_code"], registry=r)
        self.latency = Histogram("grpc_server_handling_seconds", "Time to serve a gRPC call, by method.",
                                 ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("elias_rpc_in_flight", "gRPC calls being served now.", registry=r)
        self.batch_size = Histogram("elias_batch_size", "Queries per search: batched by the dynamic batcher's "
                                    "worker, or inline (a lone caller searching in its own thread).", ["route"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self._batched, self._inline = self.batch_size.labels("batched"), self.batch_size.labels("inline")
        r.register(_IndexCollector(server))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def observe_batch(self, size: int, inline: bool = False) -> None:
        """The dynamic batcher's hook: one search of `size` queries."""
        (self._inline if inline else self._batched).observe(size)


class _IndexCollector:
    """Index metrics read from the server at scrape time (the index may be swapped while serving)."""

    def __init__(self, server: SearchServer):
        self.server = server

    def collect(self) -> Any:
        s = self.server
        yield GaugeMetricFamily("elias_rpc_max_concurrent", "Calls served at once; more get RESOURCE_EXHAUSTED.",
                                value=s.cfg.max_concurrent_rpcs)
        searcher = s.servicer.searcher
        if searcher is not None:
            yield InfoMetricFamily("elias_index", "The index being served.",
                                   value={"index_version": searcher.index_version or ""})
        load_s = getattr(s, "index_load_seconds", None)
        if load_s is not None:
            yield GaugeMetricFamily("elias_index_load_seconds", "Seconds the index being served took to load.",
                                    value=float(load_s))


class Observability:
    """What a server exposes about itself: `interceptor` for `grpc.server`, `start`/`stop` for the endpoint."""

    def __init__(self, server: SearchServer, metrics: bool, log_access: bool):
        self.server = server
        self.metrics = ServerMetrics(server) if metrics else None
        self.interceptor = _Interceptor(self, log_access)
        self.port = 0  # the metrics endpoint's port once started
        self._http: Any = None

    @property
    def on_batch(self) -> Callable[[int, bool], None] | None:
        """The hook to give a `DynamicBatcher` (None without metrics)."""
        return self.metrics.observe_batch if self.metrics is not None else None

    def start(self, host: str, port: int) -> int:
        """Serve the metrics at http://host:port/metrics (port 0: any free one); return the bound port."""
        if self.metrics is None:
            return 0
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} for metrics: {e.strerror or e}") from None
        self.port = int(self._http.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def index_version(self) -> str:
        searcher = self.server.servicer.searcher
        return searcher.index_version if searcher is not None else ""

    def concurrency_exceeded(self) -> bool:
        """Whether grpc is about to refuse the call being intercepted with RESOURCE_EXHAUSTED.

        grpc refuses calls past `maximum_concurrent_rpcs` without running them, so no handler sees them. It runs
        the interceptors first, under the lock under which it decided (grpc/_server.py, _process_event_and_continue),
        so its own count answers exactly. A grpc without that private state: never (such calls go uncounted)."""
        state = getattr(self.server.server, "_state", None)
        limit = getattr(state, "maximum_concurrent_rpcs", None)
        return limit is not None and getattr(state, "active_rpc_count", 0) >= limit


class _Interceptor(grpc.ServerInterceptor):
    """Wraps each unary method's handler to time it, count its status code and write its access log line."""

    def __init__(self, owner: Observability, log_access: bool):
        self.owner = owner
        self.log_access = log_access
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._counters: dict[tuple[str, grpc.StatusCode], Any] = {}  # labelled children, looked up once

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        cached = self._handlers.get(method)
        if cached is None or cached[0] is not handler:
            wrapped = grpc.unary_unary_rpc_method_handler(self._wrap(method, handler.unary_unary),
                                                          handler.request_deserializer, handler.response_serializer)
            cached = self._handlers[method] = (handler, wrapped)
        if self.owner.concurrency_exceeded():
            self._record(method, grpc.StatusCode.RESOURCE_EXHAUSTED, None, "", None, None,
                         "Concurrent RPC limit exceeded!")
        return cached[1]

    def _wrap(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        metrics = self.owner.metrics
        service, _, name = method.lstrip("/").rpartition("/")
        latency = metrics.latency.labels(service, name) if metrics is not None else None
        in_flight = metrics.in_flight if metrics is not None else None

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            if in_flight is not None:
                in_flight.inc()
            response = None
            try:
                response = behavior(request, context)
                return response
            finally:
                elapsed = time.perf_counter() - t0
                if in_flight is not None:
                    in_flight.dec()
                if latency is not None:
                    latency.observe(elapsed)
                code = _final_code(context, response is not None)
                details = context.details() if code != grpc.StatusCode.OK else None
                self._record(method, code, elapsed, context.peer(), request, response,
                             details.decode("utf-8", "replace") if isinstance(details, bytes) else details)

        return call

    def _record(self, method: str, code: grpc.StatusCode, elapsed: float | None, peer: str, request: Any,
                response: Any, error: str | None) -> None:
        metrics = self.owner.metrics
        service, _, name = method.lstrip("/").rpartition("/")
        if metrics is not None:
            counter = self._counters.get((method, code))
            if counter is None:
                counter = self._counters[(method, code)] = metrics.handled.labels(service, name, code.name)
            counter.inc()
        if not self.log_access or service.startswith("grpc.") or not access_log.isEnabledFor(logging.INFO):
            return  # health checks and reflection are counted, not logged
        version = getattr(response, "index_version", None)
        line: dict[str, Any] = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "method": method, "code": code.name,
            "ms": round(1000 * elapsed, 3) if elapsed is not None else None,
            "peer": peer, "queries": _num_queries(request),
            "index_version": version if version is not None else self.owner.index_version(),
        }
        if error:
            line["error"] = error
        access_log.info(json.dumps(line, ensure_ascii=False))


def _final_code(context: grpc.ServicerContext, returned: bool) -> grpc.StatusCode:
    """The status the client gets: set by `abort`/`set_code`; else OK when a response came back (unless the
    caller went away first) and UNKNOWN when the handler raised."""
    code = context.code()  # type: ignore[attr-defined]
    if code is not None:
        return code
    if not returned:
        return grpc.StatusCode.UNKNOWN
    if not context.is_active():
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else \
            grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


def _num_queries(request: Any) -> int | None:
    if request is None:
        return None
    if hasattr(request, "queries"):
        return len(request.queries)
    return 1 if hasattr(request, "query") else 0
