"""Property-based fuzzing of a real `elias serve` (BENCHMARKS.md, "## Reliability: fuzzing").

    .venv/bin/python bench/fuzz_grpc.py                          # 10,000 requests on runs/bench-eurlex57k-index
    .venv/bin/python bench/fuzz_grpc.py --index DIR --requests 2000 --no-write
    .venv/bin/python bench/fuzz_grpc.py --quick --benchmarks-file /tmp/B.md   # a tiny trained index (the tests)

`hypothesis` strategies build `SearchRequest` / `SearchBatchRequest` messages from the index's own limits
(GetIndexInfo): wrong and zero dimensions, NaN/inf, empty and multi-MB texts, sparse queries with out-of-range,
duplicate and wrapped (uint32) ids and mismatched lengths, k / beam_size / shortlist_size at 0, at the limit and
past it, huge batches, unset oneofs, explain/rerank flags, raw bytes that are no valid message (sent through a
generic call), and calls cancelled mid-flight or given a deadline of a few milliseconds. Up to `--concurrency`
calls are in flight at once. Each request knows the codes it may get (OK for a valid one, INVALID_ARGUMENT for
an invalid one, RESOURCE_EXHAUSTED past the message size limit, plus CANCELLED / DEADLINE_EXCEEDED where the
client cancels or sets a short deadline); anything else is counted as unexpected, INTERNAL and UNKNOWN as bugs.

`elias serve` keeps 2 malloc arenas and a fixed 1 MiB mmap threshold (elias_retrieval/malloc.py; under glibc's
defaults its resident memory drifts up by tens of percent across its 68 worker threads). After a warm-up (valid
batches at the server's concurrency limit, so that all its worker threads exist; the largest valid calls; then
generated calls) its resident memory is taken; at the end it must have grown by less than `--max-rss-growth`
(5%), the child must be alive and report SERVING. Then the server gets SIGTERM while calls keep coming:
those calls may get UNAVAILABLE (the only phase where it is allowed) and the child must exit with status 0.
"""

from __future__ import annotations

import argparse
import os
import signal
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
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from grpc_load import spawn_elias_serve  # noqa: E402
from report import command_line, machine, parse_args, today, write_section  # noqa: E402
from tiny_index import tiny_text_index  # noqa: E402

from elias_retrieval.client import SearchClient  # noqa: E402
from elias_retrieval.proto.elias.v1 import searcher_pb2 as pb  # noqa: E402

SECTION = "## Reliability: fuzzing"
DEFAULT_INDEX = ROOT / "runs" / "bench-eurlex57k-index"
# --quick: seconds, for the tests. Its few hundred warm-up calls do not bring the allocator to its steady state,
# so the memory bound there only catches a gross leak; the full run holds the server to 5%.
QUICK = {"requests": 300, "warmup": 300, "shutdown_calls": 40, "heavy_warmup": False, "max_rss_growth": 0.5}
CODES = ["OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"]
BUGS = {"INTERNAL", "UNKNOWN"}
MAX_MESSAGE_MB = 4
SERVER_SLOTS = 64  # `elias serve --max-concurrent`'s default
WORDS = ["market", "wine", "regulation", "common", "organisation", "customs", "tariff", "Geschichte", "Stadt",
         "fisheries", "import", "export", "duty", "Mittelalter", "agriculture", "council", "directive", "the", "of"]
U32 = 2**32
# How often each family is drawn (per 100 calls): huge batches and multi-MB texts take the server a second or so.
FAMILIES = {"valid": 25, "params": 10, "embedding": 10, "sparse": 10, "text": 10, "unset": 4, "batch": 10,
            "huge batch": 1, "big text": 1, "raw bytes": 8, "mutated bytes": 6, "info": 5}


@dataclass
class Call:
    """One generated call: what it sends, and the status codes a correct server may answer."""

    family: str
    method: str  # Search | SearchBatch | GetIndexInfo
    request: object  # a message, or bytes for a raw call
    expect: set[str]
    mode: str = "wait"  # wait | cancel | deadline
    delay_s: float = 0.0  # cancel: after this long; deadline: this deadline
    k: int = 0  # the k a valid search asked for (reply check)
    queries: int = 1


@dataclass
class Tally:
    codes: dict[str, Counter] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    bad_replies: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: Call, code: str, details: str) -> None:
        with self.lock:
            self.codes.setdefault(call.family, Counter())[code] += 1
            if code not in call.expect:
                what = call.request if isinstance(call.request, bytes) else _summary(call.request)
                self.unexpected.append(f"{call.family}/{call.method}/{call.mode}: {code} {details[:200]!r} for "
                                       f"{str(what)[:300]}")


def _summary(msg: object) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg, as_one_line=True, float_format=".3g")[:300]  # type: ignore[arg-type]


# ----- strategies (built from GetIndexInfo) -----


class Strategies:
    def __init__(self, info: pb.IndexInfo):
        self.info = info
        self.kinds = set(info.query_kinds)
        self.limit = MAX_MESSAGE_MB << 20
        # Built once: constructing a composite strategy costs milliseconds (hypothesis inspects its source).
        self.any_params, self.valid_params = self._params(None), self._params(True)
        self.text, self.big_text, self.embedding = self._text(), self._big_text(), self._embedding()
        self.sparse, self.small_sparse = self._sparse(), self._sparse(small=True)
        self.query = st.one_of(self.text, self.embedding, self.small_sparse, st.just((pb.Query(), False)))
        self.valid_query = self.query.filter(lambda qv: qv[1])
        self.by_family = {"valid": self.valid_query, "params": self.valid_query, "embedding": self.embedding,
                          "sparse": self.sparse, "text": self.text, "big text": self.big_text,
                          "unset": st.just((pb.Query(), False))}
        self.call = self._call()

    def _params(self, valid: bool | None) -> st.SearchStrategy[tuple[pb.SearchParams, bool, int]]:
        """(params, valid, resolved k): each of k, beam_size, shortlist_size unset, in range, at 0, at the limit,
        past it or at 2^32 - 1."""
        i = self.info
        limits = {"k": i.max_k, "beam_size": i.num_clusters, "shortlist_size": i.max_shortlist_size}

        def value(hi: int) -> st.SearchStrategy[int | None]:
            good = st.one_of(st.none(), st.just(1), st.just(hi), st.integers(1, hi))
            bad = st.sampled_from([0, hi + 1, U32 - 1, 2**31])
            return good if valid else st.one_of(good, bad) if valid is None else bad

        @st.composite
        def build(draw: st.DrawFn) -> tuple[pb.SearchParams, bool, int]:
            p = pb.SearchParams(explain=draw(st.booleans()))
            rerank = draw(st.sampled_from([None, True, False]))
            if rerank is not None:
                p.rerank = rerank
            ok = True
            for name, hi in limits.items():
                v = draw(value(hi))
                if v is not None:
                    setattr(p, name, v)
                    ok &= 1 <= v <= hi
            if valid is False and ok:  # at least one field past its range
                p.k = 0
                ok = False
            return p, ok, p.k if p.HasField("k") else i.defaults.k

        return build()

    def _text(self) -> st.SearchStrategy[tuple[pb.Query, bool]]:
        words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=30).map(" ".join)
        odd = st.text(max_size=200)  # any unicode, NUL and whitespace-only strings included
        return st.one_of(words, odd, st.sampled_from(["", " ", "\n\t", "\x00"])).map(
            lambda t: (pb.Query(text=t), "text" in self.kinds and bool(t.strip())))

    def _big_text(self) -> st.SearchStrategy[tuple[pb.Query, bool]]:
        """1 to 6 MB of text: below the 4 MiB message limit it must be searched, above it refused."""
        sizes = st.one_of(st.integers(1 << 20, 6 << 20), st.sampled_from([(4 << 20) - 64, (4 << 20) + 64, 6 << 20]))
        return sizes.map(
            lambda n: (pb.Query(text=("wine market regulation " * (n // 23 + 1))[:n]), "text" in self.kinds))

    def _embedding(self) -> st.SearchStrategy[tuple[pb.Query, bool]]:
        d = self.info.dim

        @st.composite
        def build(draw: st.DrawFn) -> tuple[pb.Query, bool]:
            n = draw(st.sampled_from([d, d, d, 0, 1, d - 1, d + 1, 2 * d]))
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            v = rng.standard_normal(n).astype(np.float32)
            oddity = draw(st.sampled_from(["none", "nan", "inf", "-inf", "huge", "tiny", "zeros"]))
            if n and oddity in ("nan", "inf", "-inf"):
                v[draw(st.integers(0, n - 1))] = float(oddity)
            elif oddity == "huge":
                v *= 3e38 / max(1e-30, float(np.abs(v).max(initial=1.0)))
            elif oddity == "tiny":
                v *= 1e-42
            elif oddity == "zeros":
                v[:] = 0
            ok = n == d and bool(np.isfinite(v).all())
            return pb.Query(embedding=pb.DenseEmbedding(values=v.tolist())), ok

        return build()

    def _sparse(self, small: bool = False) -> st.SearchStrategy[tuple[pb.Query, bool]]:
        """Up to 40 ids, or 1,000, or 600,000 (past the message limit) unless `small`."""
        F = self.info.num_features

        @st.composite
        def build(draw: st.DrawFn) -> tuple[pb.Query, bool]:
            n = draw(st.integers(0, 40) if small else st.one_of(st.integers(0, 40), st.sampled_from([1000, 600_000])))
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            ids = rng.integers(0, max(F, 1), n, dtype=np.int64)
            if n and draw(st.booleans()):
                ids[rng.integers(0, n, max(1, n // 3))] = ids[0]  # duplicates
            bad_id = draw(st.sampled_from([None, None, F, F + 1, U32 - 1, U32 - 5, 2**31]))
            if n and bad_id is not None:
                ids[draw(st.integers(0, n - 1))] = bad_id
            vals = rng.random(n).astype(np.float32)
            extra = draw(st.sampled_from([0, 0, 0, -1, 1, 5]))
            vals = np.concatenate([vals, np.ones(max(0, extra), np.float32)])[: max(0, n + extra)]
            oddity = draw(st.sampled_from(["none", "none", "nan", "inf", "negative", "huge"]))
            if len(vals) and oddity in ("nan", "inf"):
                vals[0] = float(oddity)
            elif oddity == "negative":
                vals = -vals
            elif oddity == "huge":
                vals[:] = 3e38
            ok = ("sparse" in self.kinds and n > 0 and extra == 0 and bool((ids < F).all())
                  and bool(np.isfinite(vals).all()))
            return pb.Query(sparse=pb.SparseFeatures(indices=ids.tolist(), values=vals.tolist())), ok

        return build()

    def _call(self) -> st.SearchStrategy[Call]:
        @st.composite
        def build(draw: st.DrawFn) -> Call:
            family = draw(st.sampled_from([f for f, w in FAMILIES.items() for _ in range(w)]))
            call = self._family(draw, family)
            if family != "info" and draw(st.integers(0, 9)) == 0:
                call.mode = draw(st.sampled_from(["cancel", "deadline"]))
                call.delay_s = draw(st.sampled_from([0.0, 0.001, 0.003, 0.01]))
                call.expect |= {"CANCELLED"} if call.mode == "cancel" else {"DEADLINE_EXCEEDED"}
            return call

        return build()

    def _family(self, draw: st.DrawFn, family: str) -> Call:
        if family == "info":
            return Call(family, "GetIndexInfo", pb.GetIndexInfoRequest(), {"OK"})
        if family in ("raw bytes", "mutated bytes"):
            method = draw(st.sampled_from(["Search", "SearchBatch", "GetIndexInfo"]))
            if family == "raw bytes":
                data = draw(st.binary(max_size=64))
            else:
                q, _ = draw(self.query)
                data = bytearray(pb.SearchRequest(query=q, params=draw(self.any_params)[0]).SerializeToString()[:4096])
                for _ in range(draw(st.integers(1, 4))):
                    if data:
                        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
                data = bytes(data[: draw(st.integers(0, len(data)))])
            # Bytes may happen to parse as a valid request: OK then, else INVALID_ARGUMENT, never INTERNAL.
            return Call(family, method, data, {"OK", "INVALID_ARGUMENT"})
        if family in ("batch", "huge batch"):
            M = self.info.max_batch_queries
            n = draw(st.integers(0, 8) if family == "batch" else st.sampled_from([M, M + 1, 5 * M]))
            pool = [draw(self.query if draw(st.booleans()) else self.valid_query) for _ in range(min(n, 3))]
            qs = [pool[i % len(pool)] for i in range(n)]
            params, pok, k = draw(self.any_params)
            req = pb.SearchBatchRequest(queries=[q for q, _ in qs], params=params)
            ok = 1 <= n <= M and pok and all(v for _, v in qs)
            return self._sized(Call(family, "SearchBatch", req, set(), k=k, queries=n), ok)
        q, qok = draw(self.by_family[family])
        params, pok, k = draw(self.any_params if family == "params" else self.valid_params)
        req = pb.SearchRequest(params=params) if family == "unset" and draw(st.booleans()) else \
            pb.SearchRequest(query=q, params=params)
        return self._sized(Call(family, "Search", req, set(), k=k), qok and pok)

    def _sized(self, call: Call, valid: bool) -> Call:
        too_big = call.request.ByteSize() > self.limit  # type: ignore[attr-defined]
        call.expect = {"RESOURCE_EXHAUSTED"} if too_big else {"OK"} if valid else {"INVALID_ARGUMENT"}
        if call.method == "SearchBatch" and valid and not too_big:
            call.expect.add("RESOURCE_EXHAUSTED")  # the answer may exceed the message limit (said so, not INTERNAL)
        return call


# ----- sending -----


class Sender:
    """Issues calls asynchronously (at most `concurrency` in flight) and tallies their status codes."""

    def __init__(self, channel: grpc.Channel, info: pb.IndexInfo, concurrency: int,
                 probe: psutil.Process | None = None, every: int = 0):
        self.info = info
        self.probe, self.every = probe, every
        self.rss: list[int] = []  # the server's RSS every `every` calls
        self.tally = Tally()
        self.slots = threading.BoundedSemaphore(concurrency)
        self.stubs = {m: (channel.unary_unary(f"/elias.v1.Searcher/{m}", request_serializer=None,
                                              response_deserializer=None), resp)
                      for m, resp in (("Search", pb.SearchResponse), ("SearchBatch", pb.SearchBatchResponse),
                                      ("GetIndexInfo", pb.IndexInfo))}
        self.sent = 0

    def send(self, call: Call) -> None:
        self.slots.acquire()
        self.sent += 1
        if self.probe is not None and self.every and self.sent % self.every == 0:
            self.rss.append(self.probe.memory_info().rss)
            print(f"  {self.sent:,} calls, server RSS {self.rss[-1] / (1 << 20):,.0f} MiB", flush=True)
        stub, _ = self.stubs[call.method]
        body = call.request if isinstance(call.request, bytes) else call.request.SerializeToString()  # type: ignore[attr-defined]
        timeout = call.delay_s if call.mode == "deadline" else 120.0
        fut = stub.future(body, timeout=max(timeout, 1e-4))
        fut.add_done_callback(lambda f: self._done(call, f))
        if call.mode == "cancel":
            if call.delay_s:
                time.sleep(call.delay_s)
            fut.cancel()

    def _done(self, call: Call, f: grpc.Future) -> None:
        try:
            code = f.code().name if not f.cancelled() else "CANCELLED"
            details = (f.details() or "") if not f.cancelled() else "cancelled by the client"
            self.tally.add(call, code, details)
            if code == "OK" and not isinstance(call.request, bytes):
                self._check_reply(call, f.result())
        finally:
            self.slots.release()

    def _check_reply(self, call: Call, body: bytes) -> None:
        if call.method == "GetIndexInfo":
            return
        _, resp_type = self.stubs[call.method]
        resp = resp_type.FromString(body)
        results = [resp.result] if call.method == "Search" else list(resp.results)
        L = self.info.num_labels
        wrong = len(results) != call.queries or any(
            len(r.hits) > call.k or any(h.index >= L for h in r.hits) for r in results)
        if wrong:
            with self.tally.lock:
                self.tally.bad_replies.append(f"{call.family}: {len(results)} results for {call.queries} queries, "
                                              f"k={call.k}")

    def drain(self, concurrency: int) -> None:
        for _ in range(concurrency):
            self.slots.acquire()
        for _ in range(concurrency):
            self.slots.release()


def fuzz(sender: Sender, strategies: Strategies, n: int, random_seed: int) -> None:
    """Send `n` calls drawn by hypothesis from `random_seed` (the same seed gives the same calls)."""
    @seed(random_seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(call=strategies.call)
    def run(call: Call) -> None:
        sender.send(call)

    run()


def wide_warmup(sender: Sender, info: pb.IndexInfo, slots: int, heavy: bool) -> None:
    """Valid batches, `slots` at once (the server's limit), so that its worker threads all exist before the memory
    baseline (each new thread adds its own memory); with `heavy`, then the largest valid calls, `slots` at once (a
    text just under the message limit, a full batch), so that the allocator has met its peak."""
    small = pb.Query(text="wine market regulation") if "text" in info.query_kinds else \
        pb.Query(embedding=pb.DenseEmbedding(values=[0.1] * info.dim))
    for _ in range(2 * slots):
        batch = pb.SearchBatchRequest(queries=[small] * (info.max_batch_queries // 8))
        sender.send(Call("warm-up", "SearchBatch", batch, {"OK"}, k=info.defaults.k, queries=len(batch.queries)))
    sender.drain(slots)
    if not heavy:
        return
    big = pb.Query(text=("wine market regulation " * 200_000)[: (4 << 20) - 256]) if small.text else small
    batch = pb.SearchBatchRequest(queries=[small] * info.max_batch_queries)
    for _ in range(slots):
        sender.send(Call("warm-up", "Search", pb.SearchRequest(query=big), {"OK"}, k=info.defaults.k))
        sender.send(Call("warm-up", "SearchBatch", batch, {"OK", "RESOURCE_EXHAUSTED"}, k=info.defaults.k,
                         queries=info.max_batch_queries))
    sender.drain(slots)


def shutdown_phase(proc, address: str, info: pb.IndexInfo, calls: int) -> tuple[Counter, int | None]:
    """SIGTERM the server while valid calls keep coming; their codes and the child's exit status."""
    codes: Counter = Counter()
    req = pb.SearchRequest(query=pb.Query(embedding=pb.DenseEmbedding(values=[0.1] * info.dim)))
    with grpc.insecure_channel(address) as ch:
        stub = ch.unary_unary("/elias.v1.Searcher/Search", request_serializer=None, response_deserializer=None)
        futs = [stub.future(req.SerializeToString(), timeout=30) for _ in range(calls // 2)]
        proc.send_signal(signal.SIGTERM)
        for _ in range(calls - calls // 2):
            futs.append(stub.future(req.SerializeToString(), timeout=30))
            time.sleep(0.005)
        for f in futs:
            codes[f.code().name] += 1
    try:
        return codes, proc.wait(60)
    except Exception:  # noqa: BLE001 - still running: a failure the report states
        proc.kill()
        return codes, None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=None, help="default: runs/bench-eurlex57k-index (--quick: a tiny "
                                                             "trained index in a temporary directory)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=1_000, help="generated calls before the memory baseline")
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight at once")
    ap.add_argument("--shutdown-calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-growth", type=float, default=0.05, help="fail past this growth of the server's RSS")
    ap.add_argument("--heavy-warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="start the warm-up with the largest valid calls (off with --quick: they take seconds)")
    ap.add_argument("--quick", action="store_true", help="a few hundred calls on a tiny index (the tests)")
    ap.add_argument("--benchmarks-file", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true")
    args = parse_args(ap, QUICK, argv)
    desc = machine()
    work = None
    index = args.index
    if index is None:
        if args.quick:
            work = tempfile.TemporaryDirectory(prefix="elias-fuzz-")
            index = tiny_text_index(Path(work.name))
        else:
            index = DEFAULT_INDEX
    log: list[str] = []
    proc, address = spawn_elias_serve(index, args.threads, MAX_MESSAGE_MB, log=log)
    child = psutil.Process(proc.pid)
    try:
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as ch, SearchClient(address, timeout=30) as client:
            info = client.info()
            strategies = Strategies(info)
            t0 = time.perf_counter()
            wide_warmup(Sender(ch, info, SERVER_SLOTS), info, SERVER_SLOTS, args.heavy_warmup)
            warm = Sender(ch, info, args.concurrency)
            fuzz(warm, strategies, args.warmup, args.seed + 1)
            warm.drain(args.concurrency)
            rss0, threads0 = child.memory_info().rss, child.num_threads()
            sender = Sender(ch, info, args.concurrency, child, max(1, args.requests // 10))
            t1 = time.perf_counter()
            fuzz(sender, strategies, args.requests, args.seed)
            sender.drain(args.concurrency)
            elapsed = time.perf_counter() - t1
            alive = proc.poll() is None
            rss1, threads1 = (child.memory_info().rss, child.num_threads()) if alive else (0, 0)
            health = client.health() if alive else "DEAD"
        print(f"{sender.sent:,} calls in {elapsed:.1f} s (warm-up {t1 - t0:.1f} s)", flush=True)
        down, exit_code = shutdown_phase(proc, address, info, args.shutdown_calls) if alive else (Counter(), None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if work is not None:
            work.cleanup()
    t = sender.tally
    totals: Counter = sum(t.codes.values(), Counter())
    growth = (rss1 - rss0) / rss0 if rss0 else float("inf")
    tracebacks = sum("Traceback" in line for line in log)
    body = report(args, desc, index, info, sender, totals, elapsed, (rss0, rss1, threads0, threads1), health, down,
                  exit_code, tracebacks)
    print(body)
    if not args.no_write:
        write_section(SECTION, body, *([args.benchmarks_file] if args.benchmarks_file else []))
    problems = []
    if not alive:
        problems.append("the server died")
    if bugs := {c: totals[c] for c in BUGS if totals[c]}:
        problems.append(f"bug status codes {bugs}")
    if t.unexpected:
        problems.append(f"{len(t.unexpected)} unexpected codes, e.g. {t.unexpected[:3]}")
    if t.bad_replies:
        problems.append(f"{len(t.bad_replies)} malformed replies, e.g. {t.bad_replies[:3]}")
    if health != "SERVING":
        problems.append(f"health {health} at the end")
    if growth >= args.max_rss_growth:
        problems.append(f"RSS grew {100 * growth:.1f}%")
    if set(down) - {"OK", "UNAVAILABLE", "CANCELLED"} or exit_code != 0:
        problems.append(f"shutdown: codes {dict(down)}, exit status {exit_code}")
    if problems:
        print("\n".join(log[-40:]), file=sys.stderr)
        raise SystemExit("FAILED: " + "; ".join(problems))


def report(args: argparse.Namespace, desc: str, index: Path, info: pb.IndexInfo, sender: Sender, totals: Counter,
           elapsed: float, server: tuple[int, int, int, int], health: str, down: Counter, exit_code: int | None,
           tracebacks: int) -> str:
    t = sender.tally
    rss0, rss1, threads0, threads1 = server
    others = sorted(set(totals) - set(CODES))
    cols = CODES + others
    head = "| family | calls | " + " | ".join(cols) + " | unexpected |"
    rows = [head, "|" + "---|" * (len(cols) + 3)]
    unexpected = Counter(u.split("/", 1)[0] for u in t.unexpected)
    for fam in sorted(t.codes, key=lambda f: -sum(t.codes[f].values())):
        c = t.codes[fam]
        rows.append(f"| {fam} | {sum(c.values()):,} | " + " | ".join(f"{c[x]:,}" for x in cols)
                    + f" | {unexpected[fam]} |")
    rows.append(f"| **all** | **{sum(totals.values()):,}** | " + " | ".join(f"**{totals[x]:,}**" for x in cols)
                + f" | **{len(t.unexpected)}** |")
    index_desc = "a tiny index trained on 300 TIBKAT rows (--quick)" if args.quick and args.index is None else \
        f"`{os.path.relpath(index, ROOT) if index.is_absolute() else index}`"
    mib = 1 << 20
    return "\n".join([
        f"Machine: {desc}.",
        f"Date: {today()}.",
        f"Command: `{command_line()}`.",
        "",
        f"A real `elias serve` child (`--threads {args.threads}`, 4 MiB message limit, `--max-concurrent 64`, "
        "its own malloc settings: 2 arenas, 1 MiB mmap threshold) on "
        f"{index_desc}: {info.num_labels:,} labels, {info.num_clusters} clusters, d = {info.dim}, query kinds "
        f"{', '.join(info.query_kinds)}, max_k {info.max_k}, max_shortlist_size {info.max_shortlist_size}, "
        f"max_batch_queries {info.max_batch_queries}. {sender.sent:,} calls generated by `hypothesis` "
        f"(seed {args.seed}) after {args.warmup:,} warm-up calls, at most {args.concurrency} in "
        f"flight, in {elapsed:.1f} s. "
        + f"The warm-up starts with {2 * SERVER_SLOTS} valid batches, {SERVER_SLOTS} at once (so that all the "
        "server's worker threads exist)"
        + (", then the largest valid calls (a text just under the message limit, a full batch), as many at once"
           if args.heavy_warmup else "") + ". "
        + "A family names what a call varies; about 1 call in 10 (not `info`) is "
        "cancelled by the client after 0-10 ms or given a 0.1-10 ms deadline. `unexpected`: a code the call's "
        "request does not allow (e.g. OK for a NaN embedding, INVALID_ARGUMENT for a valid request); INTERNAL or "
        "UNKNOWN would be a server bug.",
        "",
        *rows,
        "",
        f"- Server crashes: {int(health == 'DEAD')}; health at the end: "
        f"{health}; malformed OK replies: {len(t.bad_replies)}; tracebacks in the server log: {tracebacks}.",
        f"- Server RSS after the warm-up {rss0 / mib:,.1f} MiB, after the run {rss1 / mib:,.1f} MiB "
        f"({100 * (rss1 - rss0) / max(rss0, 1):+.1f}%); every {max(1, args.requests // 10):,} calls: "
        + ", ".join(f"{r / mib:,.0f}" for r in sender.rss) + f" MiB; threads {threads0} before, {threads1} after.",
        f"- Shutdown: SIGTERM while {args.shutdown_calls} valid calls were sent: "
        + ", ".join(f"{k} {v}" for k, v in sorted(down.items())) + f"; exit status {exit_code}.",
    ])


if __name__ == "__main__":
    main()
