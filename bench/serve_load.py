"""Sustained load and overload of a real `elias serve` (BENCHMARKS.md, "## Reliability: sustained load").

    .venv/bin/python bench/serve_load.py                 # EURLEX57K texts, then a 1M-label synthetic index
    .venv/bin/python bench/serve_load.py --seconds 20 --no-write
    .venv/bin/python bench/serve_load.py --quick --benchmarks-file /tmp/B.md   # tiny indexes (the tests)

Sustained: `--clients` calls outstanding at all times (a closed loop: each answer sends the next query) for
`--seconds`, (a) text queries (the EURLEX57K test split) on runs/bench-eurlex57k-index and (b) embedding queries
on a synthetic index of `--labels` labels (d = 256, fp16; written once by `synthetic.write_synthetic_index` under
`--work-dir` and reused). Reported per `--window` seconds: calls, errors, queries/s, p50/p99; and the server's
resident memory, open file descriptors and threads before (after a warm-up) and after the run.

Overload: against `--max-concurrent 64`, waves of `--overload-calls` calls sent at once (text queries on the
first index): the calls past the limit must get RESOURCE_EXHAUSTED at once, never wait for a slot and time out.
Reported: admitted and rejected calls, the time to a rejection and the latency of the admitted calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from grpc_load import spawn_elias_serve  # noqa: E402
from report import command_line, machine, parse_args, percentiles, today, write_section  # noqa: E402
from tiny_index import tiny_text_index  # noqa: E402

from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb  # noqa: E402

SECTION = "## Reliability: sustained load"
EURLEX_INDEX = ROOT / "runs" / "bench-eurlex57k-index"
EURLEX_DATA = ROOT.parent / "shared" / "data" / "eurlex57k"
TIBKAT_DATA = ROOT.parent / "shared" / "data" / "tibkat"
QUICK = {"seconds": 2.0, "window": 1.0, "labels": 20_000, "clusters": 256, "kappa": 200, "queries": 200,
         "overload_seconds": 1.0}
MiB = 1 << 20


@dataclass
class Loop:
    """A closed loop's outcome: (finish time, latency) of each OK call, and the codes of the others."""

    ok: list[tuple[float, float]] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0


def closed_loop(address: str, bodies: list[bytes], clients: int, seconds: float, channels: int = 4) -> Loop:
    """`clients` calls outstanding (spread over `channels` channels) for `seconds`; serialized Search requests."""
    out, lock, done = Loop(), threading.Lock(), threading.Event()
    state = {"live": clients, "stop_at": 0.0, "t0": 0.0}
    chans = [grpc.insecure_channel(address) for _ in range(channels)]
    stubs = [c.unary_unary("/elias.v1.Searcher/Search", request_serializer=None, response_deserializer=None)
             for c in chans]

    def issue(i: int) -> None:
        t = time.perf_counter()
        f = stubs[i % channels].future(bodies[i % len(bodies)], timeout=30)
        f.add_done_callback(lambda f: finished(f, t, i))

    def finished(f: grpc.Future, t: float, i: int) -> None:
        now = time.perf_counter()
        code = f.code()
        with lock:
            if code == grpc.StatusCode.OK:
                out.ok.append((now - state["t0"], now - t))
            else:
                out.errors[code.name] += 1
            again = now < state["stop_at"]
            if not again:
                state["live"] -= 1
                if state["live"] == 0:
                    done.set()
        if again:
            issue(i + clients)

    try:
        state["t0"] = time.perf_counter()
        state["stop_at"] = state["t0"] + seconds
        for i in range(clients):
            issue(i)
        done.wait(seconds + 120)
        out.elapsed = time.perf_counter() - state["t0"]
    finally:
        for c in chans:
            c.close()
    return out


@dataclass
class Overload:
    admitted: list[float] = field(default_factory=list)  # latency of OK calls
    rejected: list[float] = field(default_factory=list)  # time to RESOURCE_EXHAUSTED
    others: Counter = field(default_factory=Counter)
    waves: int = 0
    issue_s: list[float] = field(default_factory=list)  # how long the client took to send each wave


def overload(address: str, bodies: list[bytes], calls: int, seconds: float) -> Overload:
    """Waves of `calls` calls sent at once (one channel), for about `seconds`."""
    out = Overload()
    with grpc.insecure_channel(address) as ch:
        stub = ch.unary_unary("/elias.v1.Searcher/Search", request_serializer=None, response_deserializer=None)
        stop_at = time.perf_counter() + seconds
        while out.waves == 0 or time.perf_counter() < stop_at:
            lock, left, done = threading.Lock(), [calls], threading.Event()

            def finished(f: grpc.Future, t: float, lock: threading.Lock = lock, left: list[int] = left,
                         done: threading.Event = done) -> None:
                dt = time.perf_counter() - t
                code = f.code()
                with lock:
                    if code == grpc.StatusCode.OK:
                        out.admitted.append(dt)
                    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        out.rejected.append(dt)
                    else:
                        out.others[code.name] += 1
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            t_wave = time.perf_counter()
            for i in range(calls):
                t = time.perf_counter()
                f = stub.future(bodies[i % len(bodies)], timeout=30)
                f.add_done_callback(lambda f, t=t: finished(f, t))
            out.issue_s.append(time.perf_counter() - t_wave)
            done.wait(120)
            out.waves += 1
    return out


def server_stats(p: psutil.Process) -> dict[str, float]:
    return {"rss": p.memory_info().rss / MiB, "fds": p.num_fds(), "threads": p.num_threads()}


def text_bodies(data_dir: Path, n: int) -> list[bytes]:
    from elias_retrieval.data import read_split

    texts = read_split(data_dir, "test", max_rows=n).texts
    if not texts:
        raise SystemExit(f"{data_dir}: the test split has no texts")
    return [pb.SearchRequest(query=pb.Query(text=t)).SerializeToString() for t in texts]


def embedding_bodies(index_dir: Path, n: int, seed: int = 0) -> list[bytes]:
    """Queries near random labels' classifiers (rows of the index's W_L, memory-mapped), normalised."""
    from elias_retrieval.index_format import read_index

    t = read_index(index_dir).tensors
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(t.num_labels, n, replace=False))
    w = t.W_L[rows].float().numpy()
    if t.W_L_scale is not None:
        w = w * t.W_L_scale[rows].float().numpy()[:, None]
    q = w / np.linalg.norm(w, axis=1, keepdims=True) + rng.standard_normal(w.shape).astype(np.float32) * 0.3 / \
        np.sqrt(t.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return [pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=v.tolist()))).SerializeToString()
            for v in q.astype(np.float32)]


def synthetic_index(args: argparse.Namespace, work: Path) -> Path:
    from elias_retrieval.index_format import is_index_dir
    from elias_retrieval.synthetic import write_synthetic_index

    out = work / f"synthetic-{args.labels}-d{args.dim}-c{args.clusters}-k{args.kappa}"
    if not is_index_dir(out):
        t0 = time.perf_counter()
        write_synthetic_index(out, args.labels, dim=args.dim, kappa=args.kappa, num_clusters=args.clusters)
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


@dataclass
class Run:
    name: str
    loop: Loop
    before: dict[str, float]
    after: dict[str, float]
    over: Overload | None = None


def run_index(args: argparse.Namespace, name: str, index: Path, bodies: list[bytes]) -> Run:
    """The sustained load on one `elias serve` child."""
    proc, address = spawn_elias_serve(index, args.threads, 4, extra=["--max-concurrent", str(args.max_concurrent)])
    child = psutil.Process(proc.pid)
    try:
        closed_loop(address, bodies, args.clients, min(5.0, args.seconds))  # warm-up
        before = server_stats(child)
        print(f"{name}: {args.clients} clients for {args.seconds:.0f} s", flush=True)
        loop = closed_loop(address, bodies, args.clients, args.seconds)
        after = server_stats(child)
        if proc.poll() is not None:
            raise SystemExit(f"{name}: the server died (exit {proc.returncode})")
    finally:
        stop(proc)
    return Run(name, loop, before, after)


def run_overload(args: argparse.Namespace, index: Path, bodies: list[bytes]) -> Overload:
    """Waves of `--overload-calls` calls on a fresh child with `--max-concurrent --overload-limit`."""
    proc, address = spawn_elias_serve(index, args.threads, 4, extra=["--max-concurrent", str(args.overload_limit)])
    try:
        closed_loop(address, bodies, 8, 1.0)  # warm-up
        return overload(address, bodies, args.overload_calls, args.overload_seconds)
    finally:
        stop(proc)


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


def windows(loop: Loop, width: float) -> list[str]:
    rows = []
    t = np.array([a for a, _ in loop.ok])
    lat = np.array([b for _, b in loop.ok])
    n = max(1, int(round(loop.elapsed / width)))
    for w in range(n):
        sel = (t >= w * width) & (t < (w + 1) * width) if w < n - 1 else t >= w * width
        span = min(width, loop.elapsed - w * width) if w < n - 1 else loop.elapsed - w * width
        if not sel.any():
            rows.append(f"| {w * width:.0f}-{(w + 1) * width:.0f} | 0 | | | |")
            continue
        p50, p99 = percentiles(lat[sel].tolist())
        rows.append(f"| {w * width:.0f}-{w * width + span:.0f} | {int(sel.sum()):,} | {sel.sum() / span:,.1f} | "
                    f"{p50:.1f} | {p99:.1f} |")
    return rows


def report(args: argparse.Namespace, desc: str, runs: list[Run], names: dict[str, str]) -> str:
    lines = [f"Machine: {desc}.", f"Date: {today()}.", f"Command: `{command_line()}`.", "",
             f"A real `elias serve` child per index (`--threads {args.threads} --max-concurrent "
             f"{args.max_concurrent}`: above the {args.clients} clients, since grpcio frees a call's slot only after "
             "its answer is sent; dynamic batching on, the index's default search parameters), "
             f"{args.clients} calls outstanding at all times from one client process (4 channels, a closed loop) "
             f"for {args.seconds:.0f} s after a {min(5.0, args.seconds):.0f} s warm-up. Client and server share "
             "the machine's cores.", ""]
    for r in runs:
        lat = [b for _, b in r.loop.ok]
        p50, p99 = percentiles(lat) if lat else (0.0, 0.0)
        errors = sum(r.loop.errors.values())
        lines += [f"**{names[r.name]}**: {len(lat):,} calls in {r.loop.elapsed:.1f} s, {errors} errors"
                  + (f" ({dict(r.loop.errors)})" if errors else "") + f", {len(lat) / r.loop.elapsed:,.1f} "
                  f"queries/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms.", "",
                  "| window (s) | calls | queries/s | p50 ms | p99 ms |", "|---|---|---|---|---|",
                  *windows(r.loop, args.window), "",
                  "| server | RSS MiB | open fds | threads |", "|---|---|---|---|",
                  f"| before (after the warm-up) | {r.before['rss']:,.0f} | {r.before['fds']:.0f} | "
                  f"{r.before['threads']:.0f} |",
                  f"| after {args.seconds:.0f} s | {r.after['rss']:,.0f} | {r.after['fds']:.0f} | "
                  f"{r.after['threads']:.0f} |", ""]
    over = next((r for r in runs if r.over is not None), None)
    if over is not None and over.over is not None:
        o = over.over
        total = len(o.admitted) + len(o.rejected) + sum(o.others.values())
        rp50, rp99 = percentiles(o.rejected) if o.rejected else (0.0, 0.0)
        ap50, ap99 = percentiles(o.admitted) if o.admitted else (0.0, 0.0)
        lines += [f"**Overload** ({names[over.name]}): {o.waves} waves of {args.overload_calls} calls sent at once "
                  f"against `--max-concurrent {args.overload_limit}` (a fresh child), 30 s deadline: {total:,} calls. "
                  f"Sending a wave took the client {1e3 * float(np.median(o.issue_s)):.0f} ms (median); each call "
                  "is timed from its own send.", "",
                  "| outcome | calls | p50 ms | p99 ms |", "|---|---|---|---|",
                  f"| admitted (OK): latency | {len(o.admitted):,} | {ap50:.1f} | {ap99:.1f} |",
                  f"| rejected (RESOURCE_EXHAUSTED): time to the rejection | {len(o.rejected):,} | {rp50:.1f} | "
                  f"{rp99:.1f} |",
                  f"| other codes | {sum(o.others.values())} | | |" + (f" {dict(o.others)}" if o.others else ""), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=None, help="text index (default runs/bench-eurlex57k-index; "
                                                             "--quick: a tiny trained one)")
    ap.add_argument("--data", type=Path, default=None, help="its dataset (texts of the test split)")
    ap.add_argument("--labels", type=int, default=1_000_000, help="labels of the synthetic index")
    ap.add_argument("--clusters", type=int, default=16384)
    ap.add_argument("--kappa", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "scratch-serve-load",
                    help="where the synthetic index is written once and reused")
    ap.add_argument("--queries", type=int, default=2000, help="distinct queries per index")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--window", type=float, default=15.0, help="seconds per row of the latency table")
    ap.add_argument("--max-concurrent", type=int, default=128,
                    help="the sustained runs' server limit (above --clients: grpcio frees a call's slot only after "
                         "its answer is sent, so a client's next call can find the old one still counted)")
    ap.add_argument("--overload-limit", type=int, default=64, help="--max-concurrent of the overload run")
    ap.add_argument("--overload-calls", type=int, default=512)
    ap.add_argument("--overload-seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--quick", action="store_true", help="seconds, tiny indexes (the tests)")
    ap.add_argument("--benchmarks-file", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true")
    args = parse_args(ap, QUICK, argv)
    desc = machine()
    tmp = tempfile.TemporaryDirectory(prefix="elias-serve-load-") if args.quick else None
    try:
        work = Path(tmp.name) if tmp is not None else args.work_dir
        work.mkdir(parents=True, exist_ok=True)
        if args.index is not None:
            text_index, data = args.index, args.data or EURLEX_DATA
        elif args.quick:
            text_index, data = tiny_text_index(work / "tiny"), work / "tiny" / "data"
        else:
            text_index, data = EURLEX_INDEX, args.data or EURLEX_DATA
        synth = synthetic_index(args, work)
        names = {"text": f"Text queries on `{os.path.relpath(text_index, ROOT)}`" if not args.quick else
                 "Text queries on a tiny index (300 TIBKAT rows)",
                 "embedding": f"Embedding queries on a synthetic index: {args.labels:,} labels, d = {args.dim}, "
                              f"{args.clusters:,} clusters, kappa {args.kappa}, fp16"}
        texts = text_bodies(data, args.queries)
        runs = [run_index(args, "text", text_index, texts)]
        runs.append(run_index(args, "embedding", synth, embedding_bodies(synth, args.queries)))
        runs[0].over = run_overload(args, text_index, texts)
    finally:
        if tmp is not None:
            tmp.cleanup()
    body = report(args, desc, runs, names)
    print(body)
    if not args.no_write:
        write_section(SECTION, body, *([args.benchmarks_file] if args.benchmarks_file else []))
    problems = [f"{r.name}: errors {dict(r.loop.errors)}" for r in runs if r.loop.errors]
    o = runs[0].over
    if o is not None and (o.others or not o.rejected or not o.admitted):
        problems.append(f"overload: {len(o.admitted)} admitted, {len(o.rejected)} rejected, others {dict(o.others)}")
    if problems:
        raise SystemExit("FAILED: " + "; ".join(problems))


if __name__ == "__main__":
    main()
