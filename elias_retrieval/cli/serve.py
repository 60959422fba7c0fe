"""`elias serve` (the gRPC searcher) and `elias search` (one query, in-process or over gRPC)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from elias_retrieval.cli.app import app, console, fail, user_errors

if TYPE_CHECKING:
    from elias_retrieval.searcher import Searcher, SearchResults
    from elias_retrieval.server import SearchServer


@app.command()
@user_errors
def serve(
    index_dir: Annotated[Path, typer.Argument(help="A built index directory, or a symlink to one (SIGHUP re-reads "
                                                   "it and swaps in the index it names).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 = any free port).")] = 50051,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch intra-op threads (0 = torch's default).")] = 0,
    max_concurrent: Annotated[int, typer.Option(help="Calls served at once; more get RESOURCE_EXHAUSTED.")] = 64,
    max_message_mb: Annotated[float, typer.Option(help="Largest request or response, in MiB.")] = 4.0,
    batching: Annotated[bool, typer.Option(help="Search concurrent Search calls as one batch.")] = True,
    max_batch: Annotated[int, typer.Option(help="Dynamic batching: most queries per batch.")] = 64,
    max_wait_us: Annotated[int, typer.Option(help="Dynamic batching: longest wait for more queries (us).")] = 500,
    grace: Annotated[float, typer.Option(help="Shutdown: seconds calls in flight may take to finish.")] = 10.0,
    admin: Annotated[bool, typer.Option(help="Also serve elias.v1.Admin (ReloadIndex: swap the index).")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve TLS (with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(
        help="PEM CA: clients must present a certificate it signed (mutual TLS).")] = None,
    metrics_port: Annotated[int, typer.Option(
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (0 = off).")] = 0,
    access_log: Annotated[bool, typer.Option(help="Log one JSON line per call to stderr (elias.access).")] = False,
) -> None:
    """Serve an index over gRPC (elias.v1.Searcher, health, reflection) until SIGTERM or Ctrl-C.

    SIGHUP swaps the index without dropping calls: INDEX_DIR is resolved again (flip a symlink first), the
    index found is verified and warmed beside the served one, then calls move to it; a missing, corrupt or
    incompatible index is refused with a log line and the old one keeps serving.
    """
    import torch

    from elias_retrieval.server import ServerConfig
    from elias_retrieval.server import serve as run_server

    for name, v, lo in (("--max-concurrent", max_concurrent, 1), ("--max-batch", max_batch, 1),
                        ("--max-wait-us", max_wait_us, 0), ("--threads", threads, 0), ("--port", port, 0),
                        ("--metrics-port", metrics_port, 0)):
        if v < lo:
            fail(f"{name} must be at least {lo}, got {v}")
    if metrics_port and metrics_port == port:
        fail(f"--metrics-port must differ from --port ({port})")
    if not index_dir.is_dir():
        fail(f"{index_dir}: no such index directory")
    from elias_retrieval.tls import server_tls

    server_tls(tls_cert, tls_key, tls_client_ca, ("--tls-cert", "--tls-key", "--tls-client-ca"))  # files checked
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if access_log:
        from elias_retrieval.observability import log_access_to

        log_access_to(sys.stderr)
    cfg = ServerConfig(host=host, port=port, max_concurrent_rpcs=max_concurrent,
                       max_message_bytes=int(max_message_mb * (1 << 20)), batching=batching,
                       max_batch=max_batch, max_wait_us=max_wait_us, grace_s=grace, admin=admin,
                       tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
                       metrics_port=metrics_port or None, access_log=access_log)

    def ready(server: SearchServer, searcher: Searcher) -> None:
        info = searcher.info
        console.print(f"serving [bold]{index_dir}[/] on {server.address}: {info.num_labels:,} labels, "
                      f"{info.num_clusters:,} clusters, query kinds {', '.join(info.query_kinds)}, "
                      f"{'dynamic batching' if batching else 'no batching'}{security}", highlight=False)
        if server.metrics_port:
            h = f"[{server.cfg.host}]" if ":" in server.cfg.host else server.cfg.host
            console.print(f"metrics on http://{h}:{server.metrics_port}/metrics", highlight=False)

    security = ", mutual TLS" if tls_client_ca else ", TLS" if tls_cert else ""
    try:
        run_server(index_dir, cfg, device=device, on_ready=ready)
    except OSError as e:  # a port in use
        fail(str(e))


@app.command()
@user_errors
def search(
    args: Annotated[list[str], typer.Argument(help="INDEX_DIR QUERY_TEXT, or just QUERY_TEXT with --server.",
                                              show_default=False)],
    server: Annotated[str | None, typer.Option(help="Ask a running `elias serve` at HOST:PORT instead.")] = None,
    k: Annotated[int | None, typer.Option("-k", "--k", help="Labels returned (default: the index's).")] = None,
    beam_size: Annotated[int | None, typer.Option(help="Clusters in the beam (default: the index's).")] = None,
    shortlist_size: Annotated[int | None, typer.Option(help="Labels shortlisted (default: the index's).")] = None,
    explain: Annotated[bool, typer.Option(help="Show each label's cluster, path and classifier scores.")] = False,
    rerank: Annotated[bool, typer.Option(help="Apply the index's ELIAS++ re-ranker when it has one.")] = True,
    device: Annotated[str, typer.Option(help="In-process only: auto, cpu or cuda.")] = "cpu",
    timeout: Annotated[float, typer.Option(help="--server only: deadline in seconds.")] = 30.0,
    tls_ca: Annotated[Path | None, typer.Option(
        help="--server only: connect with TLS, trusting this PEM CA.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="--server only: PEM client certificate, for a server that wants one (mutual TLS).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="--server only: PEM private key of --tls-cert.")] = None,
) -> None:
    """Search one text query and print the ranked labels."""
    if not server and (tls_ca or tls_cert or tls_key):
        fail("--tls-ca, --tls-cert and --tls-key need --server")
    if server:
        if len(args) != 1:
            fail("with --server give only the query text")
        text = args[0]
        import grpc

        from elias_retrieval.client import SearchClient
        from elias_retrieval.tls import check_pair

        check_pair(tls_cert, tls_key, "--tls-cert", "--tls-key")
        with SearchClient(server, timeout=timeout, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key) as client:
            t0 = time.perf_counter()
            try:
                res = client.search(text=text, k=k, beam_size=beam_size, shortlist_size=shortlist_size,
                                    explain=explain, rerank=rerank)
            except grpc.RpcError as e:
                hint = ""
                if e.code() == grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    hint = (" (with TLS: is --tls-ca the CA of the server's certificate, and does the server want a "
                            "client certificate, --tls-cert/--tls-key?)" if tls_ca or tls_cert else
                            " (if the server uses TLS, give --tls-ca)")
                fail(f"{server}: {e.code().name}: {e.details()}{hint}")  # type: ignore[attr-defined]
            elapsed = time.perf_counter() - t0
            version, where = client.last_index_version, server
    else:
        if len(args) != 2:
            fail("give INDEX_DIR and the query text (or --server HOST:PORT and the query text)")
        index_dir, text = Path(args[0]), args[1]
        if not index_dir.is_dir():
            fail(f"{index_dir}: no such index directory")
        from elias_retrieval.searcher import Searcher

        searcher = Searcher.open(index_dir, device=device, resident=False)
        t0 = time.perf_counter()
        res = searcher.search_texts([text], k=k, beam_size=beam_size, shortlist_size=shortlist_size, explain=explain,
                                    rerank=rerank)
        elapsed = time.perf_counter() - t0
        version, where = searcher.index_version, str(index_dir)
    console.print(results_table(res, 0, explain))
    method = res.methods[0] if res.methods else "ELIAS"
    console.print(f"{len(res.label_ids[0])} labels by {method} from {where} (index version {version or '-'}) "
                  f"in {1000 * elapsed:.1f} ms", highlight=False)


def results_table(r: SearchResults, row: int, explain: bool) -> Table:
    """A rich table of one result row: rank, score, label id, name (and the explanation)."""
    table = Table(show_edge=False, pad_edge=False)
    for col in ("rank", "score", "label id", "name"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    if explain:
        for col in ("cluster", "path", "classifier"):
            table.add_column(col, justify="right")
    for j, (lid, name) in enumerate(zip(r.label_ids[row], r.label_names[row], strict=True)):
        cells = [str(j + 1), f"{r.scores[row, j]:.4f}", lid, name]
        if explain and r.cluster is not None and r.path is not None and r.label_prob is not None:
            cells += [str(int(r.cluster[row, j])), f"{r.path[row, j]:.4f}", f"{r.label_prob[row, j]:.4f}"]
        table.add_row(*cells)
    return table
