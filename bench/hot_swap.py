"""Hot index swap under load (BENCHMARKS.md, "Reliability: hot swap").

    .venv/bin/python bench/hot_swap.py                                        # bibtex, two seeds, 20 swaps
    .venv/bin/python bench/hot_swap.py --quick --benchmarks-file /tmp/B.md    # tiny smoke run (the tests)

Two models are trained on the same dataset with different seeds and built into two indexes (same label space,
different answers); both versions' answers to the query set (the test split's sparse rows) are computed in
this process first. A real `elias serve CURRENT --admin` child serves a "current" symlink while N client
threads search it without pause; the driver swaps back and forth between the versions (flip the symlink, then
SIGHUP, or every `--admin-every`-th time elias.v1.Admin/ReloadIndex), timing each swap from the trigger to the
first answer naming the new version. Every response must succeed and its hits must equal what the version it
names answers in-process (ids in order; where dynamic batching reorders near-equal scores, equal scores to
1e-4 count as equal, reported apart). Then a corrupt copy of the other version is swapped to (SIGHUP and the
admin RPC) under the same load: it must be refused, the old version keep answering, health stay SERVING.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from grpc_load import await_port  # noqa: E402
from report import BENCHMARKS, command_line, machine, parse_args, today, write_section  # noqa: E402

SECTION = "## Reliability: hot swap"
TINY = ["train.max_train_points=300", "train.stage1_epochs=1", "train.stage2_epochs=1", "train.stage1_min_examples=0",
        "train.stage2_min_examples=0", "model.dim=16", "train.batch_size=128", "train.reranker=false",
        "train.threads=1", "train.device=cpu"]  # as tests/test_cli.py
QUICK = {"clients": 8, "swaps": 4, "admin_every": 2, "queries": 50, "dwell": 0.2}


@dataclass
class Call:
    query: int
    version: str
    ids: list[str]
    scores: list[float]
    t0: float
    t1: float


@dataclass
class Load:
    """N client threads searching without pause; every call's answer (or error) is kept."""

    address: str
    queries: list
    clients: int
    calls: list[Call] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        return threads

    def _client(self, seed: int) -> None:
        import grpc

        from elias_retrieval.proto.elias.v1 import searcher_pb2_grpc as pb_grpc

        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.SearcherStub(ch)
            while not self.stop.is_set():
                i = int(rng.integers(len(self.queries)))
                t0 = time.monotonic()
                try:
                    r = stub.Search(self.queries[i], timeout=30)
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]
                    continue
                hits = r.result.hits
                self.calls.append(Call(i, r.index_version, [h.label_id for h in hits], [h.score for h in hits], t0,
                                       time.monotonic()))


def build_versions(dataset: Path, workdir: Path, overrides: list[str], seeds: list[int]) -> tuple[list[Path], int]:
    """Train and build one index per seed under `workdir` (an index already there is reused); the indexes and how
    many were built now."""
    from elias_retrieval.config import EliasConfig
    from elias_retrieval.index_format import is_index_dir
    from index_builder.build import build_index
    from trainer.train import train

    out, built = [], 0
    for seed in seeds:
        model, index = workdir / f"{dataset.name}-seed{seed}", workdir / f"{dataset.name}-seed{seed}-index"
        if not is_index_dir(index):
            train(dataset, model, EliasConfig().with_overrides([*overrides, f"train.seed={seed}"]), progress=False)
            build_index(model, index, progress=False)
            built += 1
        out.append(index)
    return out, built


def answers(index: Path, queries: list, k: int) -> tuple[str, list[tuple[list[str], np.ndarray]], dict[str, object]]:
    """The index's version, its in-process answer (label ids, scores) to each query alone, and its shape."""
    from elias_retrieval.searcher import Searcher

    s = Searcher.open(index, device="cpu", resident=False)
    p = s.resolve_params(k=k)
    out = []
    for q in queries:
        r = s.search([q], p)
        out.append((r.label_ids[0], r.scores[0, : len(r.label_ids[0])].copy()))
    i = s.info
    return s.index_version, out, {"labels": i.num_labels, "dim": i.dim, "encoder": i.encoder, "reranker": i.reranker}


def agrees(call: Call, expected: tuple[list[str], np.ndarray]) -> str:
    """"exact", "ties" (same scores rank by rank to 1e-4, near-equal scores ordered otherwise) or "wrong"."""
    ids, scores = expected
    if call.ids == ids:
        return "exact"
    if len(call.ids) == len(ids) and np.allclose(call.scores, scores, rtol=1e-4, atol=1e-4):
        return "ties"
    return "wrong"


def spawn(link: Path, threads: int) -> tuple[subprocess.Popen, str, list[str]]:
    """`elias serve LINK --admin` on a loopback port; its log lines are collected by a thread."""
    cmd = [sys.executable, "-m", "elias_retrieval", "serve", str(link), "--host", "127.0.0.1", "--port", "0",
           "--device", "cpu", "--threads", str(threads), "--admin"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log: list[str] = []

    def lines() -> Iterable[str]:
        while line := proc.stderr.readline():  # type: ignore[union-attr]
            log.append(line)
            yield line

    address = await_port(proc, lines(), r"listening on 127\.0\.0\.1:(\d+)")
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return proc, address, log


def wait_for(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


def corrupt_copy(src: Path, dst: Path) -> Path:
    from elias_retrieval.index_format import TENSORS

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    with open(dst / TENSORS, "r+b") as f:  # one flipped bit near the end: sizes and shapes still check out
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    return dst


def ms(xs: list[float]) -> str:
    return f"{1e3 * float(np.percentile(xs, 50)):.0f} / {1e3 * max(xs):.0f}" if xs else "-"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path, nargs="?", default=ROOT.parent / "shared" / "data" / "xc" / "bibtex")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the two models and indexes go (default runs/scratch-swap; --quick: a temp dir)")
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--admin-every", type=int, default=5, help="every n-th swap through the admin RPC, else SIGHUP")
    ap.add_argument("--queries", type=int, default=500, help="test rows used as queries")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--dwell", type=float, default=1.0, help="seconds of load between swaps")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--quick", action="store_true", help=f"tiny models (TINY overrides), {QUICK}")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the section goes")
    args = parse_args(ap, QUICK, argv)

    import grpc

    from elias_retrieval.client import SearchClient
    from elias_retrieval.data import read_split
    from elias_retrieval.index_swap import point_symlink
    from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb
    from elias_retrieval.searcher import Query

    machine_desc = machine()
    tmp = tempfile.TemporaryDirectory() if args.quick and args.workdir is None else None
    workdir = Path(tmp.name) if tmp else (args.workdir or ROOT / "runs" / "scratch-swap")
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    recipe_overrides = TINY if args.quick else ["train.device=cpu", "train.threads=1"]
    indexes, built = build_versions(args.dataset, workdir, recipe_overrides, args.seeds)
    build_s = time.perf_counter() - t0
    X = read_split(args.dataset, "test", max_rows=args.queries).features.tocsr()
    rows = [X[i] for i in range(X.shape[0]) if X[i].nnz]
    queries = [Query(sparse=(r.indices.astype(np.int64), r.data.astype(np.float32))) for r in rows]
    requests = [pb.SearchRequest(query=pb.Query(sparse=pb.SparseFeatures(indices=q.sparse[0].tolist(),  # type: ignore[index]
                                                                          values=q.sparse[1].tolist())),  # type: ignore[index]
                                 params=pb.SearchParams(k=args.k)) for q in queries]
    expected: dict[str, list[tuple[list[str], np.ndarray]]] = {}
    versions, shape = [], {}
    for index in indexes:
        v, out, shape = answers(index, queries, args.k)
        expected[v] = out
        versions.append(v)
    if len(set(versions)) != 2:
        raise SystemExit(f"the two indexes have the same version {versions[0]}: nothing to tell apart")
    differ = sum(a[0] != b[0] for a, b in zip(*expected.values(), strict=True))

    link = workdir / "current"
    point_symlink(link, indexes[0])
    proc, address, log = spawn(link, args.threads)
    client = SearchClient(address, timeout=60)
    try:
        wait_for(lambda: _health(client) == "SERVING", 300, "the server to serve")
        load = Load(address, requests, args.clients)
        threads = load.start()
        time.sleep(args.dwell)
        swaps: list[tuple[str, float, float]] = []  # (trigger, start, end) on time.monotonic()
        current = 0
        for n in range(args.swaps):
            nxt = 1 - current
            point_symlink(link, indexes[nxt])
            by_admin = args.admin_every > 0 and n % args.admin_every == args.admin_every - 1
            s0 = time.monotonic()
            if by_admin:
                client.reload_index()
            else:
                proc.send_signal(signal.SIGHUP)
            wait_for(lambda v=versions[nxt]: client.info().index_version == v, 300, f"swap {n + 1}")
            swaps.append(("admin" if by_admin else "SIGHUP", s0, time.monotonic()))
            current = nxt
            time.sleep(args.dwell)

        # A corrupt copy of the other version, under the same load: SIGHUP, then the admin RPC.
        bad = corrupt_copy(indexes[1 - current], workdir / "corrupt-index")
        calls_before, c0 = len(load.calls), time.monotonic()
        point_symlink(link, bad)
        refused_before = sum("reload refused" in x for x in log)
        health_seen: set[str] = set()
        proc.send_signal(signal.SIGHUP)

        def refused() -> bool:
            health_seen.add(_health(client))
            return sum("reload refused" in x for x in log) > refused_before

        wait_for(refused, 300, "the corrupt index to be refused")
        try:
            client.reload_index()
            admin_code, admin_msg = "OK", ""
        except grpc.RpcError as e:
            admin_code, admin_msg = e.code().name, e.details()  # type: ignore[attr-defined]
        end = time.monotonic() + args.dwell
        while time.monotonic() < end:
            health_seen.add(_health(client))
            time.sleep(0.02)
        corrupt_calls = [c for c in load.calls[calls_before:] if c.t1 >= c0]
        point_symlink(link, indexes[current])
        load.stop.set()
        for t in threads:
            t.join(60)
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
        if tmp is not None:
            tmp.cleanup()

    verdicts = [agrees(c, expected[c.version][c.query]) if c.version in expected else "wrong" for c in load.calls]
    count = {k: verdicts.count(k) for k in ("exact", "ties", "wrong")}
    per_version = {v: sum(c.version == v for c in load.calls) for v in versions}
    during = sum(any(s <= c.t1 <= e for _, s, e in swaps) for c in load.calls)
    swap_s = [e - s for _, s, e in swaps]
    by = {k: [e - s for t, s, e in swaps if t == k] for k in ("SIGHUP", "admin")}
    server = [(float(a), float(b)) for a, b in re.findall(r"warmed in ([0-9.]+) s, old index released in ([0-9.]+) s",
                                                           "".join(log))]
    refusal = next((x.strip() for x in log if "reload refused" in x), "(none logged)")
    refusal = re.sub(r"^.*?reload refused", "reload refused", refusal).replace(str(workdir), "WORKDIR")
    corrupt_ok = (len(corrupt_calls) > 0 and all(c.version == versions[current] for c in corrupt_calls)
                  and not load.errors and health_seen == {"SERVING"} and admin_code == "FAILED_PRECONDITION")
    recipe = "300 training rows, the TINY overrides of tests/test_cli.py" if args.quick else "default config"
    data_desc = f"{args.dataset.name} ({recipe}, `train.device=cpu`), seeds {args.seeds[0]} and {args.seeds[1]}"
    served_by = ", ".join(f"{per_version[v]:,} by {v}" for v in versions)
    admin_msg = admin_msg.replace(str(workdir), "WORKDIR")
    lines = [
        f"Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.",
        "",
        f"Two indexes of {data_desc}: versions {versions[0]} and {versions[1]} ({shape['labels']:,} labels, dim "
        f"{shape['dim']}, encoder {shape['encoder']}, re-ranker {'yes' if shape['reranker'] else 'no'}; "
        f"{f'both trained and built by this run in {build_s:.0f} s' if built == 2 else f'{2 - built} reused'}). "
        f"Queries: {len(queries)} test rows as sparse "
        f"queries, k={args.k}; the two versions' top-{args.k} lists differ on {differ} of them. A real `elias serve "
        f"CURRENT --admin --threads {args.threads}` child; {args.clients} client threads (one channel each) search "
        f"without pause while the driver makes {args.swaps} swaps back and forth, {len(by['SIGHUP'])} by flipping "
        f"the symlink and sending SIGHUP, {len(by['admin'])} through elias.v1.Admin/ReloadIndex, with {args.dwell:g} s "
        "of load between swaps. Swap time: from the trigger to the first GetIndexInfo naming the new version.",
        "",
        "| | |",
        "|---|---|",
        f"| calls | {len(load.calls) + len(load.errors):,} ({served_by}) |",
        f"| failed calls | {len(load.errors)}{' (' + load.errors[0] + ')' if load.errors else ''} |",
        f"| hits equal to the named version's in-process answer | {count['exact']:,} exactly, {count['ties']:,} up to "
        "the order of near-equal scores |",
        f"| hits not equal | {count['wrong']} |",
        f"| swap time p50 / max (ms), all {len(swap_s)} | {ms(swap_s)} |",
        f"| swap time p50 / max (ms), SIGHUP; admin | {ms(by['SIGHUP'])}; {ms(by['admin'])} |",
        f"| server: load + verify + warm-up p50 / max (ms) | {ms([a for a, _ in server])} |",
        f"| server: switch + old index drained p50 / max (ms) | {ms([b for _, b in server])} |",
        f"| calls answered during swaps (trigger to switch) | {during:,} |",
        "",
        f"Corrupt swap under load (one flipped bit in the other version's tensors.safetensors): SIGHUP refused, "
        f"logged as `{refusal}`; the admin RPC got {admin_code} (`{admin_msg}`); health seen "
        f"{', '.join(sorted(health_seen))}; "
        f"{len(corrupt_calls):,} calls answered meanwhile, all by version {versions[current]}: "
        f"{'pass' if corrupt_ok else 'FAIL'}.",
    ]
    write_section(SECTION, "\n".join(lines), args.benchmarks_file)
    print("\n".join(lines))
    print(f"wrote {SECTION!r} in {args.benchmarks_file}")
    if load.errors or count["wrong"] or not corrupt_ok:
        raise SystemExit(1)


def _health(client) -> str:  # noqa: ANN001
    try:
        return client.health(timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure to answer is a health state here
        return type(e).__name__


if __name__ == "__main__":
    main()
