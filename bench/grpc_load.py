"""gRPC serving over loopback: latency overhead and dynamic-batching throughput (BENCHMARKS.md, "gRPC serving").

    .venv/bin/python bench/grpc_load.py                  # synthetic 1M-label index (as bench/search_latency.py)
    .venv/bin/python bench/grpc_load.py --labels 100000 --no-write
    .venv/bin/python bench/grpc_load.py --quick --benchmarks-file /tmp/B.md   # tiny smoke run (the tests)

The server runs in a child process (`--role server`) on an ephemeral loopback port; the client process
sends embedding queries. One client: p50/p99 latency of sequential Search calls against in-process
`Searcher.search_embeddings` on the same index. Many clients: a closed loop of N outstanding calls
(asynchronous futures on one channel) for a fixed time, against a server with and without dynamic batching.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import BENCHMARKS, add_index_args, command_line, machine, parse_args, today, write_section  # noqa: E402

SECTION = "## gRPC serving"
# --quick: a few seconds, for the test suite; the numbers mean nothing.
QUICK = {"labels": 10_000, "clusters": 128, "kappa": 100, "dim": 32, "shortlist": 500, "queries": 100, "clients": 4,
         "seconds": 1.0}


def build_searcher(args: argparse.Namespace):
    from elias_retrieval.searcher import Searcher
    from elias_retrieval.synthetic import synthetic_tensors

    raw = synthetic_tensors(args.labels, dim=args.dim, kappa=args.kappa, num_clusters=args.clusters, seed=0)
    info = {"index_version": f"synthetic-{args.labels}", "defaults": {"k": args.k, "beam_size": args.beam,
                                                                        "shortlist_size": args.shortlist}}
    return Searcher(raw, None, None, info, device="cpu")


def run_server(args: argparse.Namespace) -> None:
    import torch

    from elias_retrieval.server import ServerConfig, start_server

    torch.set_num_threads(args.threads)
    searcher = build_searcher(args)
    cfg = ServerConfig(port=0, batching=args.batching, max_batch=args.max_batch, max_wait_us=args.max_wait_us,
                       max_concurrent_rpcs=256)
    server = start_server(searcher, cfg)
    print("PORT", server.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(1)


def spawn_server(args: argparse.Namespace, batching: bool) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--role", "server", "--labels", str(args.labels), "--clusters",
           str(args.clusters), "--kappa", str(args.kappa), "--dim", str(args.dim), "--k", str(args.k),
           "--beam", str(args.beam), "--shortlist", str(args.shortlist), "--threads", str(args.threads),
           "--max-batch", str(args.max_batch), "--max-wait-us", str(args.max_wait_us),
           "--batching" if batching else "--no-batching"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("PORT"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, f"127.0.0.1:{line.split()[1]}"


def stop_server(proc: subprocess.Popen) -> None:
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait(30)


def one_client(address: str, embs: np.ndarray) -> list[float]:
    from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
    from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SearcherStub(ch)
        reqs = [pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=e.tolist()))) for e in embs]
        for r in reqs[:50]:
            stub.Search(r, timeout=10)
        ts = []
        for r in reqs[50:]:
            t0 = time.perf_counter()
            stub.Search(r, timeout=10)
            ts.append(time.perf_counter() - t0)
    return ts


def closed_loop(address: str, embs: np.ndarray, clients: int, seconds: float) -> tuple[float, float]:
    """N outstanding calls at all times for `seconds`; returns (queries/s, p50 latency ms)."""
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
    return state["n"] / elapsed, float(np.percentile(np.asarray(lat) * 1e3, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=["bench", "server"], default="bench")
    add_index_args(ap)
    ap.add_argument("--threads", type=int, default=2, help="server torch threads")
    ap.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-us", type=int, default=500)
    ap.add_argument("--queries", type=int, default=1000, help="sequential queries for the one-client latency")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes, a few seconds ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parse_args(ap, QUICK)
    if args.role == "server":
        run_server(args)
        return

    import torch
    from search_latency import percentiles

    machine_desc = machine()  # before the run: the load average says whether the machine was quiet

    rng = np.random.default_rng(2)
    embs = rng.normal(size=(args.queries + 50, args.dim)).astype(np.float32)
    # In-process reference, same index, same thread count, in this process (then freed).
    torch.set_num_threads(args.threads)
    searcher = build_searcher(args)
    for e in embs[:50]:
        searcher.search_embeddings(e[None])
    ts = []
    for e in embs[50:]:
        t0 = time.perf_counter()
        searcher.search_embeddings(e[None])
        ts.append(time.perf_counter() - t0)
    ip50, ip99 = percentiles(ts)
    del searcher
    print(f"in-process batch 1: p50 {ip50:.3f} ms, p99 {ip99:.3f} ms", flush=True)

    proc, address = spawn_server(args, batching=True)
    try:
        g50, g99 = percentiles(one_client(address, embs))
        print(f"gRPC one client: p50 {g50:.3f} ms, p99 {g99:.3f} ms (overhead p50 {g50 - ip50:+.3f} ms)", flush=True)
        qps_b, lat_b = closed_loop(address, embs, args.clients, args.seconds)
        print(f"{args.clients} clients, dynamic batching: {qps_b:,.0f} queries/s, p50 {lat_b:.1f} ms", flush=True)
    finally:
        stop_server(proc)
    proc, address = spawn_server(args, batching=False)
    try:
        qps_n, lat_n = closed_loop(address, embs, args.clients, args.seconds)
        print(f"{args.clients} clients, no batching: {qps_n:,.0f} queries/s, p50 {lat_n:.1f} ms", flush=True)
    finally:
        stop_server(proc)
    print(f"batching / no batching throughput: {qps_b / qps_n:.2f}x")
    if args.no_write:
        return
    setup = (f"synthetic index L = {args.labels:,}, C = {args.clusters:,}, kappa = {args.kappa}, d = {args.dim}, "
             f"fp16 W_L, k = {args.k}, beam = {args.beam}, shortlist = {args.shortlist}; embedding queries; "
             f"server and clients on the same machine, server torch threads = {args.threads}, "
             f"batching max {args.max_batch} queries / {args.max_wait_us} us")
    lines = [
        f"Setup: {setup}. Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.", "",
        "| measurement | p50 (ms) | p99 (ms) | queries/s |",
        "| --- | --- | --- | --- |",
        f"| in-process `search_embeddings`, batch 1 | {ip50:.3f} | {ip99:.3f} | |",
        f"| gRPC `Search`, one client | {g50:.3f} | {g99:.3f} | |",
        f"| gRPC overhead over in-process (p50) | {g50 - ip50:+.3f} | | |",
        f"| {args.clients} concurrent clients, dynamic batching | {lat_b:.1f} | | {qps_b:,.0f} |",
        f"| {args.clients} concurrent clients, no batching | {lat_n:.1f} | | {qps_n:,.0f} |",
        f"| throughput ratio, batching / no batching | | | {qps_b / qps_n:.2f}x |",
    ]
    write_section(SECTION, "\n".join(lines), args.benchmarks_file)
    print(f"wrote {SECTION!r} in {args.benchmarks_file}")


if __name__ == "__main__":
    main()
