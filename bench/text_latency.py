"""Text queries end to end over gRPC, one index per encoder (BENCHMARKS.md, "## Text queries over gRPC, by encoder").

    .venv/bin/python bench/text_latency.py runs/bench-encoders/tfidf-index runs/bench-encoders/hybrid-index
    .venv/bin/python bench/text_latency.py --quick --benchmarks-file /tmp/B.md     # a tiny tf-idf index (the tests)

Each index is served by a real `elias serve` child (`--threads`, dynamic batching on). The client sends the test
split's texts as Search calls: one at a time (p50/p99 of the round trip: tokenising or featurising, encoding,
search, re-ranking, the wire) and as a closed loop of `--clients` outstanding calls, where the server's dynamic
batches encode several texts together (queries/s, p50/p99).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from grpc_load import spawn_elias_serve  # noqa: E402
from report import command_line, machine, parse_args, percentiles, today, write_section  # noqa: E402
from serve_load import EURLEX_DATA, closed_loop, stop, text_bodies  # noqa: E402
from tiny_index import TIBKAT, tiny_text_index  # noqa: E402

SECTION = "## Text queries over gRPC, by encoder"
QUICK = {"queries": 40, "seconds": 2.0, "clients": 4}


def one_client(address: str, bodies: list[bytes], n: int) -> list[float]:
    """Round trips (s) of `n` sequential Search calls, after a warm-up of 10."""
    with grpc.insecure_channel(address) as chan:
        call = chan.unary_unary("/elias.v1.Searcher/Search", request_serializer=None, response_deserializer=None)
        for b in bodies[:10]:
            call(b, timeout=60)
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            call(bodies[i % len(bodies)], timeout=60)
            out.append(time.perf_counter() - t0)
    return out


def measure(index: Path, bodies: list[bytes], args: argparse.Namespace) -> dict[str, float | str]:
    manifest = json.loads((index / "manifest.json").read_text())
    proc, address = spawn_elias_serve(index, args.threads, 4)
    try:
        seq = one_client(address, bodies, args.queries)
        loop = closed_loop(address, bodies, args.clients, args.seconds)
        if proc.poll() is not None:
            raise SystemExit(f"{index}: the server died (exit {proc.returncode})")
    finally:
        stop(proc)
    p50, p99 = percentiles(seq)
    lat = [d for _, d in loop.ok]
    l50, l99 = percentiles(lat) if lat else (float("nan"), float("nan"))
    return {"encoder": str(manifest.get("encoder")), "reranker": "yes" if manifest.get("reranker") else "no",
            "p50": p50, "p99": p99, "qps": len(lat) / max(1e-9, loop.elapsed), "l50": l50, "l99": l99,
            "errors": sum(loop.errors.values())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("indexes", nargs="*", type=Path, help="index directories (one per encoder)")
    ap.add_argument("--data", type=Path, default=EURLEX_DATA, help="the dataset whose test texts are sent")
    ap.add_argument("--threads", type=int, default=2, help="server torch threads")
    ap.add_argument("--queries", type=int, default=300, help="sequential calls for the one-client latency")
    ap.add_argument("--clients", type=int, default=8, help="outstanding calls in the closed loop")
    ap.add_argument("--seconds", type=float, default=20.0, help="closed-loop duration")
    ap.add_argument("--quick", action="store_true", help=f"a tiny tf-idf index, few calls ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    args = parse_args(ap, QUICK, argv)
    with tempfile.TemporaryDirectory() as tmp:
        indexes, data = list(args.indexes), args.data
        if args.quick:
            indexes, data = [tiny_text_index(Path(tmp))], TIBKAT
        if not indexes:
            ap.error("give at least one index directory (or --quick)")
        bodies = text_bodies(data, max(args.queries, 200))
        rows = [(index, measure(index, bodies, args)) for index in indexes]
    lines = [f"Machine: {machine()}. Date: {today()}. Command: `{command_line()}`.", "",
             f"Texts: the first {len(bodies)} test documents of {data.name}; server `--threads {args.threads}`, "
             f"dynamic batching on; one client: {args.queries} sequential Search calls after 10 warm-up calls; "
             f"loaded: {args.clients} calls outstanding for {args.seconds:.0f} s.", "",
             "| index | encoder | ELIAS++ re-ranking | one client p50 (ms) | p99 (ms) | "
             f"{args.clients} clients: queries/s | p50 (ms) | p99 (ms) | errors |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for index, r in rows:
        name = index.name if not args.quick else "tiny TIBKAT index"
        lines.append(f"| {name} | {r['encoder']} | {r['reranker']} | {r['p50']:.2f} | {r['p99']:.2f} "
                     f"| {r['qps']:.0f} | {r['l50']:.2f} | {r['l99']:.2f} | {r['errors']} |")
    text = "\n".join(lines)
    if args.no_write:
        print(text)
    else:
        write_section(SECTION, text, args.benchmarks_file)
        print(f"wrote {SECTION!r} in {args.benchmarks_file}")


if __name__ == "__main__":
    main()
