"""gRPC serving over loopback: latency overhead and dynamic-batching throughput (BENCHMARKS.md, "gRPC serving").

    .venv/bin/python bench/grpc_load.py                  # synthetic 1M-label index (as bench/search_latency.py)
    .venv/bin/python bench/grpc_load.py --labels 100000 --no-write
    .venv/bin/python bench/grpc_load.py --quick --benchmarks-file /tmp/B.md   # tiny smoke run (the tests)
    .venv/bin/python bench/grpc_load.py --quality INDEX_DIR ../shared/data/eurlex57k    # "EURLEX57K over gRPC"

The server runs in a child process (`--role server`) on an ephemeral loopback port; the client process
sends embedding queries. One client: p50/p99 latency of sequential Search calls against in-process
`Searcher.search_embeddings` on the same index (timed in alternating blocks), and the round trip of an empty
GetIndexInfo call: what any call costs in this gRPC stack, the floor under the overhead; and a bare echo method
on raw bytes (no protobuf, no work) that takes and returns as many bytes as a Search: the floor for those bytes.
The server child also times its own searches and its Search handler around them (and the handler's parsing and
checks and its response's bytes), and, after the run, the same queries in a loop on its main thread (and the
handler's own work on them, back to back): the in-process reference with the server's memory, threads and cores.
On a small machine the client shares, the client process's own in-process figure moves with what else runs (a
2-thread search whose second thread is descheduled waits at every parallel region), so the loop inside the
server is the fair one. A loop runs its searches back to back, with their data hot in the caches; a round trip
leaves ~1.5 ms between two searches, so the server child also times the loop with that much busy waiting before
each search. `--pin` puts the server and the client on separate cores. Many clients (1, 8, 32, 64 by default):
a closed loop of N outstanding calls (asynchronous futures on one channel) for a fixed time, against a server
with and without dynamic batching: queries/s, p50/p99, failed calls and the server's resident memory before and
after.

--quality serves a built index with a real `elias serve` child instead, sends the dataset's test texts in
SearchBatch calls and checks that R@100 (and each query's top-k ids) over gRPC equal `Searcher.search_texts` in
this process on the same index, batches and thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import (  # noqa: E402
    BENCHMARKS,
    add_index_args,
    ceiling_line,
    command_line,
    machine,
    machine_ceiling,
    parse_args,
    percentiles,
    publish,
    today,
    write_section,
)

SECTION = "## gRPC serving"
# Between two searches a one-client gRPC round trip leaves about this long (the empty-call floor plus the
# request's and response's handling); the server child also times its loop with this much busy time between.
GAP_S = 0.0015
PINNED_SECTION = "## gRPC serving, server and client on separate cores"
QUALITY_SECTION = "## EURLEX57K over gRPC"
# --quick: a few seconds, for the test suite; the numbers mean nothing.
QUICK = {"labels": 10_000, "clusters": 128, "kappa": 100, "dim": 32, "shortlist": 500, "queries": 100, "clients": 4,
         "client_counts": [1, 4], "seconds": 1.0}


def build_searcher(args: argparse.Namespace):
    from elias_retrieval.label_layout import in_cluster_order
    from elias_retrieval.searcher import Searcher
    from elias_retrieval.synthetic import synthetic_tensors

    # Labels in cluster order, as an index written by `elias build-index` stores them.
    raw = in_cluster_order(synthetic_tensors(args.labels, dim=args.dim, kappa=args.kappa,
                                             num_clusters=args.clusters, seed=0))
    info = {"index_version": f"synthetic-{args.labels}", "defaults": {"k": args.k, "beam_size": args.beam,
                                                                        "shortlist_size": args.shortlist}}
    return Searcher(raw, None, None, info, device="cpu")


ECHO_METHOD = "/bench.Echo/Echo"


def echo_handler() -> grpc.GenericRpcHandler:
    """A bare unary method on raw bytes: the request's first 4 bytes say how many bytes to answer. With a Search's
    request and response sizes, it is the framework's floor for those bytes (an empty call carries none)."""
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return bytes(struct.unpack_from("<I", request)[0])

    handler = grpc.unary_unary_rpc_method_handler(echo)
    return grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})


def run_server(args: argparse.Namespace) -> None:
    import torch

    from elias_retrieval.server import (
        ResponseEncoder,
        SearcherServicer,
        SearchServer,
        ServerConfig,
        params_from_proto,
        query_from_proto,
    )

    torch.set_num_threads(args.threads)
    searcher = build_searcher(args)
    # The one-client phase (its warm-up included), timed inside the server: each Search call makes one
    # `search_checked` call; the whole Search handler around it; and two parts of the handler's own work:
    # before the search (parsing, checks) and the response's bytes. Reported on exit.
    keep = args.queries + 50
    times: list[float] = []
    handler: list[tuple[float, float, float]] = []  # (whole handler, before the search, the response's bytes)
    marks: dict[str, float] = {}
    search_checked, handle = searcher.search_checked, SearcherServicer.Search
    encode = ResponseEncoder.search_response

    def timed(*a: Any, **kw: Any) -> Any:
        marks["search"] = t0 = time.perf_counter()
        try:
            return search_checked(*a, **kw)
        finally:
            if len(times) < keep:
                times.append(time.perf_counter() - t0)

    def timed_encode(self: Any, *a: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return encode(self, *a)
        finally:
            marks["encode"] = time.perf_counter() - t0

    def timed_handler(self: Any, request: Any, context: Any) -> Any:
        marks.clear()
        t0 = time.perf_counter()
        try:
            return handle(self, request, context)
        finally:
            if len(handler) < keep and "encode" in marks:
                handler.append((time.perf_counter() - t0, marks["search"] - t0, marks["encode"]))

    searcher.search_checked = timed  # type: ignore[method-assign]
    SearcherServicer.Search = timed_handler  # type: ignore[method-assign]
    ResponseEncoder.search_response = timed_encode  # type: ignore[method-assign]
    cfg = ServerConfig(port=0, batching=args.batching, max_batch=args.max_batch, max_wait_us=args.max_wait_us,
                       max_concurrent_rpcs=256)
    server = SearchServer(cfg)
    server.server.add_generic_rpc_handlers((echo_handler(),))
    server.start()
    server.attach(searcher)
    print("PORT", server.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(1)
    searcher.search_checked = search_checked  # type: ignore[method-assign]
    ResponseEncoder.search_response = encode  # type: ignore[method-assign]
    print("SEARCH_S", json.dumps(times[50:]), flush=True)
    for i, key in enumerate(("HANDLER_S", "BEFORE_S", "ENCODE_S")):
        print(key, json.dumps([h[i] for h in handler[50:]]), flush=True)
    # The same queries in this process, back to back on its main thread: the in-process reference with this
    # process's memory, threads and cores, and no gRPC work between the searches; and the handler's own work
    # on the same requests and results, back to back.
    from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
    from elias_retrieval.synthetic import synthetic_queries
    from elias_retrieval.wire import HitHeads

    embs = synthetic_queries(searcher.tensors, args.queries + 50, seed=2)[0].numpy()
    encoder = ResponseEncoder(HitHeads(searcher.labels, searcher.info.num_labels))
    for key, gap in (("LOOP_S", 0.0), ("GAP_S", GAP_S)):
        loop = []
        for i, e in enumerate(embs):
            until = time.perf_counter() + gap
            while time.perf_counter() < until:  # busy, not asleep: the core stays awake, the caches go cold
                pass
            t0 = time.perf_counter()
            searcher.search_embeddings(e[None])
            if i >= 50:
                loop.append(time.perf_counter() - t0)
        print(key, json.dumps(loop), flush=True)
    reqs = [pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=e.tolist()))) for e in embs]
    results = [searcher.search_checked([searcher.check_query(query_from_proto(r.query))],
                                       params_from_proto(searcher, r.params)) for r in reqs]
    before, encoded = [], []
    for r, res in zip(reqs, results, strict=True):
        t0 = time.perf_counter()
        searcher.check_query(query_from_proto(r.query))
        params_from_proto(searcher, r.params)
        t1 = time.perf_counter()
        encoder.search_response(res, searcher.index_version)
        encoded.append(time.perf_counter() - t1)
        before.append(t1 - t0)
    print("LOOP_BEFORE_S", json.dumps(before[50:]), flush=True)
    print("LOOP_ENCODE_S", json.dumps(encoded[50:]), flush=True)


def await_port(proc: subprocess.Popen, lines: Iterable[str], pattern: str) -> str:
    """Read a server child's output until a line matches `pattern` (group 1: the port); its loopback address."""
    for line in lines:
        if m := re.search(pattern, line):
            return f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server did not start (exit {proc.returncode})")


def server_cpus(args: argparse.Namespace) -> set[int]:
    """--pin: the cores the server child runs on (the first `threads`); the benchmark's client gets the others."""
    return set(range(args.threads)) if getattr(args, "pin", False) else set()


def client_cpus(args: argparse.Namespace) -> set[int]:
    return set(range(args.threads, os.cpu_count() or 1)) if getattr(args, "pin", False) else set()


def spawn_server(args: argparse.Namespace, batching: bool) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--role", "server", "--labels", str(args.labels), "--clusters",
           str(args.clusters), "--kappa", str(args.kappa), "--dim", str(args.dim), "--k", str(args.k),
           "--beam", str(args.beam), "--shortlist", str(args.shortlist), "--threads", str(args.threads),
           "--max-batch", str(args.max_batch), "--max-wait-us", str(args.max_wait_us),
           "--batching" if batching else "--no-batching"]
    cpus = server_cpus(args)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return proc, await_port(proc, [proc.stdout.readline()], r"^PORT (\d+)")  # type: ignore[union-attr]


def spawn_elias_serve(index_dir: Path, threads: int, max_message_mb: int, load_timeout_s: float = 300.0,
                      extra: Sequence[str] = (), log: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """A real `elias serve INDEX_DIR [EXTRA...]` child on an ephemeral loopback port, once its health check says
    SERVING.

    Its stderr (the log) is drained by a thread into `log`, so the child never blocks on it; failures quote its tail.
    """
    from elias_retrieval.client import SearchClient

    cmd = [sys.executable, "-m", "elias_retrieval", "serve", str(index_dir.resolve()), "--host", "127.0.0.1",
           "--port", "0", "--device", "cpu", "--threads", str(threads), "--max-message-mb", str(max_message_mb),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = [] if log is None else log

    def drain() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            log.append(line)

    def lines() -> Iterable[str]:
        while line := proc.stderr.readline():  # type: ignore[union-attr]
            log.append(line)
            yield line

    try:
        address = await_port(proc, lines(), r"listening on 127\.0\.0\.1:(\d+)")
    except RuntimeError as e:
        raise RuntimeError(f"elias serve {index_dir}: {e}:\n{''.join(log[-20:])}") from None
    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + load_timeout_s
    with SearchClient(address, timeout=5) as client:
        client.wait_ready(load_timeout_s)
        while client.health() != "SERVING":  # NOT_SERVING while the index loads
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"elias serve {index_dir} not serving after {load_timeout_s:.0f} s "
                                   f"(exit {proc.returncode}):\n{''.join(log[-20:])}")
            time.sleep(0.1)
    return proc, address


# What a `--role server` child reports on exit (stop_server).
KEYS = ("SEARCH_S", "HANDLER_S", "BEFORE_S", "ENCODE_S", "LOOP_S", "GAP_S", "LOOP_BEFORE_S", "LOOP_ENCODE_S")


def stop_server(proc: subprocess.Popen) -> dict[str, list[float]]:
    """Stop a server child: `--role server` exits when its stdin closes, `elias serve` on SIGTERM (graceful).

    Returns the durations (s) that a `--role server` child timed itself: "SEARCH_S", the one-client phase's
    searches inside the server, and "LOOP_S", the same queries searched in a loop in that process afterwards.
    """
    if proc.stdin is None:
        proc.terminate()
        proc.wait(30)
        return {}
    proc.stdin.close()
    out = proc.stdout.read() if proc.stdout is not None else ""
    proc.wait(60)
    return {key: json.loads(line.removeprefix(key + " ")) for line in out.splitlines()
            for key in KEYS if line.startswith(key + " ")}


def one_client(address: str, embs: np.ndarray, searcher=None, rounds: int = 4, local_cpus: set[int] | None = None,
               grpc_cpus: set[int] | None = None) -> dict[str, list[float]]:
    """Sequential calls from one client: `Search` per query, and an empty `GetIndexInfo` call (the gRPC floor).

    With `searcher` (the same index in this process), blocks of in-process `search_embeddings` calls alternate
    with the gRPC blocks, so that a drift in the machine's speed hits both sides alike. Durations in seconds.
    """
    from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
    from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc

    out: dict[str, list[float]] = {"grpc": [], "empty": [], "echo": [], "local": []}
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SearcherStub(ch)
        reqs = [pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=e.tolist()))) for e in embs]
        info = pb.GetIndexInfoRequest()
        search_bytes = ch.unary_unary("/elias.v1.Searcher/Search")  # raw bytes: the response's size
        answer = len(search_bytes(reqs[0].SerializeToString(), timeout=10))
        echo = ch.unary_unary(ECHO_METHOD)
        payloads = [struct.pack("<I", answer) + bytes(max(0, r.ByteSize() - 4)) for r in reqs]
        for r, b in zip(reqs[:50], payloads, strict=False):
            stub.Search(r, timeout=10)
            stub.GetIndexInfo(info, timeout=10)
            echo(b, timeout=10)
        timed = reqs[50:]
        step = -(-len(timed) // rounds)
        for a in range(0, len(timed), step):
            if searcher is not None:
                if local_cpus:
                    os.sched_setaffinity(0, local_cpus)  # this thread only: the in-process search on the server's cores
                for e in embs[50 + a : 50 + a + step]:
                    t0 = time.perf_counter()
                    searcher.search_embeddings(e[None])
                    out["local"].append(time.perf_counter() - t0)
                if grpc_cpus:
                    os.sched_setaffinity(0, grpc_cpus)
            for r, b in zip(timed[a : a + step], payloads[50 + a : 50 + a + step], strict=True):
                t0 = time.perf_counter()
                stub.Search(r, timeout=10)
                t1 = time.perf_counter()
                stub.GetIndexInfo(info, timeout=10)
                t2 = time.perf_counter()
                echo(b, timeout=10)
                out["grpc"].append(t1 - t0)
                out["empty"].append(t2 - t1)
                out["echo"].append(time.perf_counter() - t2)
    out["sizes"] = [float(reqs[0].ByteSize()), float(answer)]
    return out


def closed_loop(address: str, embs: np.ndarray, clients: int, seconds: float) -> dict[str, float]:
    """N outstanding calls at all times for `seconds`; queries/s, p50 and p99 latency (ms) and failed calls."""
    from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
    from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc

    reqs = [pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=e.tolist()))) for e in embs]
    lock = threading.Lock()
    done = threading.Event()
    lat: list[float] = []
    state = {"n": 0, "live": 0, "stop_at": 0.0, "errors": 0}
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SearcherStub(ch)

        def issue(i: int) -> None:
            t0 = time.perf_counter()
            fut = stub.Search.future(reqs[i % len(reqs)], timeout=30)
            fut.add_done_callback(lambda f: finished(f, t0, i))

        def finished(f: grpc.Future, t0: float, i: int) -> None:
            now = time.perf_counter()
            with lock:
                if f.code() == grpc.StatusCode.OK:
                    state["n"] += 1
                    lat.append(now - t0)
                else:
                    state["errors"] += 1
                again = now < state["stop_at"]
                if not again:
                    state["live"] -= 1
                    if state["live"] == 0:
                        done.set()
            if again:
                issue(i + clients)

        for i in range(clients):  # warm-up round
            stub.Search(reqs[i % len(reqs)], timeout=30)
        t_start = time.perf_counter()
        state.update(stop_at=t_start + seconds, live=clients)
        for i in range(clients):
            issue(i)
        done.wait(seconds + 60)
        elapsed = time.perf_counter() - t_start
    if state["errors"]:
        print(f"  {state['errors']} calls failed", flush=True)
    ms = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {"qps": state["n"] / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "errors": float(state["errors"])}


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc), MiB; 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def quality(args: argparse.Namespace, machine_desc: str) -> None:
    """--quality: R@100, P@1, P@5 of the test split's texts over gRPC (`elias serve`) and in-process, compared."""
    import torch

    from elias_retrieval.client import SearchClient
    from elias_retrieval.config import EliasConfig
    from elias_retrieval.data import DataFormatError, read_split
    from elias_retrieval.index_format import IndexFormatError, read_index
    from elias_retrieval.metrics import evaluate
    from elias_retrieval.searcher import DEFAULT_MAX_BATCH_QUERIES, Query, Searcher

    index_dir, data_dir = args.quality
    try:
        index = read_index(index_dir)
        vocab, L = index.labels, index.tensors.num_labels
        data_cfg = EliasConfig.from_dict(index.manifest.get("config", {})).data
        data = read_split(data_dir, "test", data_cfg, vocab=vocab, max_rows=args.max_points)
    except (IndexFormatError, DataFormatError, OSError) as e:
        raise SystemExit(str(e)) from None
    counts = (index.train_label_counts.numpy() if index.train_label_counts is not None
              else np.zeros(L, dtype=np.int64))  # as `elias eval` does: PSP needs them, R and P do not
    num_train = int(index.manifest.get("num_train", 1))
    if data.texts is None:
        raise SystemExit(f"{data_dir}: the test split has no texts (--quality sends text queries)")
    texts, n, k, bs = data.texts, len(data), args.k, args.batch
    if not 1 <= bs <= DEFAULT_MAX_BATCH_QUERIES:
        raise SystemExit(f"--batch must be between 1 and {DEFAULT_MAX_BATCH_QUERIES} (SearchBatch's limit), got {bs}")
    batches = [texts[i:i + bs] for i in range(0, n, bs)]
    has_ranker = index.manifest.get("reranker") is not None
    del index

    torch.set_num_threads(args.threads)
    searcher = Searcher.open(index_dir, device="cpu")
    local_ids = np.full((n, k), -1, dtype=np.int64)
    local_methods: list[str] = []
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        res = searcher.search_texts(batch, k=k)
        local_ids[i * bs:i * bs + len(batch), :res.ids.shape[1]] = res.ids
        local_methods += res.methods or []
    local_s = time.perf_counter() - t0
    del searcher
    gc.collect()
    print(f"in-process: {n:,} queries in {local_s:.1f} s", flush=True)

    to_dense = vocab.index()
    remote_ids = np.full((n, k), -1, dtype=np.int64)
    remote_methods: list[str] = []
    t_start = time.perf_counter()
    proc, address = spawn_elias_serve(index_dir, args.threads, args.max_message_mb)
    start_s = time.perf_counter() - t_start
    try:
        with SearchClient(address, timeout=600, max_message_bytes=args.max_message_mb << 20) as client:
            t0 = time.perf_counter()
            for i, batch in enumerate(batches):
                res = client.search_batch([Query(text=t) for t in batch], k=k)
                for j, row in enumerate(res.label_ids):  # the dataset's label ids, back to dense ids
                    remote_ids[i * bs + j, :len(row)] = [to_dense[x] for x in row]
                remote_methods += res.methods or []
            remote_s = time.perf_counter() - t0
    finally:
        stop_server(proc)
    print(f"gRPC: {n:,} queries in {remote_s:.1f} s (server up in {start_s:.1f} s)", flush=True)

    local = evaluate(local_ids, data.labels, counts, num_train)
    remote = evaluate(remote_ids, data.labels, counts, num_train)
    differ = int((local_ids != remote_ids).any(axis=1).sum())
    diff = remote["R@100"] - local["R@100"]
    methods = sorted(set(local_methods) | set(remote_methods))
    same_methods = local_methods == remote_methods
    print(f"R@100 in-process {local['R@100']:.4f}, gRPC {remote['R@100']:.4f} ({diff:+.4f}); "
          f"{differ} of {n} top-{k} lists differ; method {'/'.join(methods)}", flush=True)

    method = ("ELIAS++ (the index's re-ranker re-orders ELIAS's top 100, the default for text queries)" if has_ranker
              else "plain ELIAS (the index has no ELIAS++ re-ranker)")
    rows = [("in-process `Searcher.search_texts`", local, local_s),
            ("gRPC `SearchBatch` to `elias serve`", remote, remote_s)]
    shown = [str(x.resolve().relative_to(ROOT)) if x.resolve().is_relative_to(ROOT) else str(x)
             for x in (index_dir, data_dir)]
    lines = [
        f"Index `{shown[0]}` (L = {L:,}), test split of `{shown[1]}`: {n:,} queries "
        f"({int(local['num_points_without_labels']):,} without labels, left out of R@100). Machine: {machine_desc}. "
        f"Date: {today()}. Command: `{command_line()}`.", "",
        f"Both paths search the raw texts with k = {k} and the index's default beam and shortlist, in batches of {bs}, "
        f"on the CPU with {args.threads} torch thread(s), and use the same default ranking: {method}; rows answered "
        f"by {'/'.join(methods)}{'' if same_methods else ' (the two paths disagree on which method answered!)'}. "
        f"gRPC: a real `elias serve` child on an ephemeral loopback port (up and SERVING in {start_s:.1f} s, not "
        f"timed below), `elias_retrieval.client.SearchClient`, messages up to {args.max_message_mb} MiB; returned "
        "label ids mapped back to dense ids through the index's label vocabulary. Metrics: "
        "`elias_retrieval.metrics.evaluate` on the top 100. Wall time: all batches, encoding included (gRPC: "
        "serialisation and loopback transport too).", "",
        "| path | R@100 | P@1 | P@5 | wall time (s) | ms/query |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {name} | {m['R@100']:.4f} | {m['P@1']:.2f} | {m['P@5']:.2f} | {sec:.2f} | {1e3 * sec / max(1, n):.2f} |"
          for name, m, sec in rows), "",
        f"R@100 difference (gRPC - in-process): {diff:+.4f} points. Queries whose top-{k} id lists differ: "
        f"{differ} of {n:,}.",
    ]
    text = "\n".join(lines)
    publish(QUALITY_SECTION, text, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["bench", "server"], default="bench")
    add_index_args(ap)
    ap.add_argument("--threads", type=int, default=2, help="server torch threads")
    ap.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-us", type=int, default=500)
    ap.add_argument("--queries", type=int, default=1000, help="sequential queries for the one-client latency")
    ap.add_argument("--clients", type=int, default=32, help="the load level of the batching / no batching ratio")
    ap.add_argument("--client-counts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32, 64],
                    help="load levels, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--pin", action="store_true",
                    help="server child on the first --threads cores, the client on the others (the in-process "
                         "reference runs on the server's cores): the search no longer shares cores with the client")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes, a few seconds ({QUICK})")
    ap.add_argument("--quality", nargs=2, type=Path, metavar=("INDEX_DIR", "DATASET_DIR"), default=None,
                    help=f"instead: the test split's R@100 over gRPC vs in-process ({QUALITY_SECTION!r})")
    ap.add_argument("--max-points", type=int, default=0, help="--quality: the first N test points (0 = all)")
    ap.add_argument("--batch", type=int, default=64, help="--quality: texts per SearchBatch call / in-process batch")
    ap.add_argument("--max-message-mb", type=int, default=64, help="--quality: largest gRPC message (MiB)")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parse_args(ap, QUICK)
    if args.pin and args.role == "bench":
        if not 0 < args.threads < (os.cpu_count() or 1):
            raise SystemExit(f"--pin needs --threads below the {os.cpu_count()} cores, to leave the client one")
        os.sched_setaffinity(0, client_cpus(args))
    if args.role == "server":
        run_server(args)
        return
    if args.quality is not None:
        quality(args, machine())
        return

    import torch

    from elias_retrieval.synthetic import synthetic_queries

    machine_desc = machine()  # before the run: the load average says whether the machine was quiet
    ceiling = machine_ceiling()
    # In-process reference: the same index in this process, timed in blocks alternating with the gRPC client's.
    torch.set_num_threads(args.threads)
    searcher = build_searcher(args)
    embs = synthetic_queries(searcher.tensors, args.queries + 50, seed=2)[0].numpy()  # each near one label
    for e in embs[:50]:
        searcher.search_embeddings(e[None])

    runs: dict[tuple[bool, int], dict[str, float]] = {}
    reported: dict[str, list[float]] = {}
    for batching in (True, False):
        proc, address = spawn_server(args, batching=batching)
        try:
            rss_before = rss_mib(proc.pid)
            if batching:
                one = one_client(address, embs, searcher, local_cpus=server_cpus(args), grpc_cpus=client_cpus(args))
                del searcher
                gc.collect()
                (ip50, ip99), (g50, g99), (e50, e99), (o50, o99) = (
                    percentiles(one[x]) for x in ("local", "grpc", "empty", "echo"))
                request_bytes, response_bytes = (int(x) for x in one["sizes"])
                print(f"one client: in-process p50 {ip50:.3f} ms, gRPC Search p50 {g50:.3f} ms (overhead "
                      f"{g50 - ip50:+.3f} ms), empty GetIndexInfo call p50 {e50:.3f} ms", flush=True)
            for n in args.client_counts:
                r = runs[batching, n] = closed_loop(address, embs, n, args.seconds)
                r["rss_before"], r["rss_after"] = rss_before, rss_mib(proc.pid)
                print(f"{n} clients, {'dynamic batching' if batching else 'no batching'}: {r['qps']:,.0f} queries/s, "
                      f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['errors']:.0f} errors, server RSS "
                      f"{r['rss_before']:,.0f} -> {r['rss_after']:,.0f} MiB", flush=True)
        finally:
            timed = stop_server(proc)
        if batching:
            reported = {k: timed.get(k, []) for k in KEYS}
    if not all(reported.values()):
        raise SystemExit("the server child reported no timed searches")
    (s50, s99), (h50, h99), (b50, _), (c50, _), (l50, l99), (p50_gap, p99_gap), (lb50, _), (lc50, _) = (
        percentiles(reported[k]) for k in KEYS)
    print(f"one client: the same searches timed inside the server p50 {s50:.3f} ms; in a loop in the server "
          f"process p50 {l50:.3f} ms", flush=True)
    n_ratio = args.clients if args.clients in args.client_counts else args.client_counts[-1]
    ratio = runs[True, n_ratio]["qps"] / runs[False, n_ratio]["qps"]
    print(f"batching / no batching throughput at {n_ratio} clients: {ratio:.2f}x")
    if args.no_write:
        return
    pinning = (f" (server child on cores {sorted(server_cpus(args))}, the client and the in-process reference's "
               f"timing loop switching between cores {sorted(client_cpus(args))} and the server's)" if args.pin else "")
    setup = (f"synthetic index L = {args.labels:,}, C = {args.clusters:,}, kappa = {args.kappa}, d = {args.dim}, "
             f"fp16 W_L, labels in cluster order (as an index stores them), k = {args.k}, beam = {args.beam}, "
             f"shortlist = {args.shortlist}; embedding queries "
             f"(`synthetic_queries`, each near one label); server and clients on the same machine{pinning}, "
             f"server torch threads = {args.threads}, batching max {args.max_batch} queries / {args.max_wait_us} us; "
             f"each load level runs {args.seconds:g} s with N calls outstanding at all times")
    lines = [
        f"Setup: {setup}. Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.", "",
        "| measurement | p50 (ms) | p99 (ms) | queries/s |",
        "| --- | ---: | ---: | ---: |",
        f"| in-process `search_embeddings`, batch 1 | {ip50:.3f} | {ip99:.3f} | |",
        f"| gRPC `Search`, one client | {g50:.3f} | {g99:.3f} | |",
        f"| gRPC overhead over in-process (p50) | {g50 - ip50:+.3f} | | |",
        f"| of which the framework floor: an empty `GetIndexInfo` call, one client | {e50:.3f} | {e99:.3f} | |",
        f"| the same searches timed inside the server (`Searcher.search_checked`) | {s50:.3f} | {s99:.3f} | |",
        f"| the same queries in a loop in the server process afterwards (`search_embeddings`, no gRPC between "
        f"them) | {l50:.3f} | {l99:.3f} | |",
        f"| search inside the server / that loop (p50s) | {s50 / l50:.2f}x | | |",
        f"| gRPC `Search` less the floor and that loop (p50s) | {g50 - e50 - l50:+.3f} | | |",
        f"| that loop with {GAP_S * 1e3:g} ms of busy waiting before each search (as long as a round trip leaves "
        f"between two searches) | {p50_gap:.3f} | {p99_gap:.3f} | |",
        f"| search inside the server / that loop with the wait (p50s) | {s50 / p50_gap:.2f}x | | |",
        f"| gRPC `Search` less the floor and that loop with the wait (p50s) | {g50 - e50 - p50_gap:+.3f} | | |",
        f"| gRPC `Search` less the search inside the server and the floor (p50s): request handling and the "
        f"response | {g50 - s50 - e50:+.3f} | | |",
        f"| the Search handler inside the server (parsing, checks, the search, the response's bytes) | {h50:.3f} | "
        f"{h99:.3f} | |",
        f"| of which not the search (p50s): the handler's own work | {h50 - s50:+.3f} | | |",
        f"| of that, before the search: in the server (entry, parsing, checks) / parsing and checks in a loop "
        f"afterwards (p50s) | {b50:.3f} / {lb50:.3f} | | |",
        f"| of that, the response's bytes: in the server / the same work in a loop afterwards (p50s) | "
        f"{c50:.3f} / {lc50:.3f} | | |",
        f"| a bare echo call on raw bytes, as large as a Search's ({request_bytes:,} bytes in, {response_bytes:,} "
        f"out), one client | {o50:.3f} | {o99:.3f} | |",
        f"| of which the bytes (p50s, echo less the empty call) | {o50 - e50:+.3f} | | |",
        f"| gRPC `Search` less the echo and the handler (p50s): what the framework does besides | "
        f"{g50 - o50 - h50:+.3f} | | |",
        f"| throughput ratio at {n_ratio} clients, batching / no batching | | | {ratio:.2f}x |",
        "",
        "| clients | dynamic batching | queries/s | p50 (ms) | p99 (ms) | errors | server RSS before -> after (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (batching, n), r in sorted(runs.items(), key=lambda x: (x[0][1], not x[0][0])):
        lines.append(f"| {n} | {'yes' if batching else 'no'} | {r['qps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['errors']:.0f} | {r['rss_before']:,.0f} -> {r['rss_after']:,.0f} |")
    best = max(r["qps"] for r in runs.values())
    lines += ["", f"{ceiling_line(ceiling)} The best throughput, {best:,.0f} queries/s, is "
              f"{best * 2 * args.dim * (args.clusters + args.shortlist) / ceiling['gemm_flops']:.1%} of the GEMM "
              "ceiling counted as the W_C and W_L products' FLOPs."]
    section = PINNED_SECTION if args.pin else SECTION
    write_section(section, "\n".join(lines), args.benchmarks_file)
    print(f"wrote {section!r} in {args.benchmarks_file}")


if __name__ == "__main__":
    main()
