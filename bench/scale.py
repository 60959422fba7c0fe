"""Scale sweep: ELIAS against faiss HNSW on synthetic indexes of growing L (BENCHMARKS.md, "Scale sweep").

    .venv/bin/python bench/scale.py                                      # L = 10k, 100k, 1M
    .venv/bin/python bench/scale.py --labels 10000,100000,1000000,4000000 --hnsw-max-labels 1000000
    .venv/bin/python bench/scale.py --labels 10000,100000 --no-write
    .venv/bin/python bench/scale.py --quick --benchmarks-file /tmp/B.md --plot /tmp/p.png   # tiny smoke run (the tests)

For each L: `elias_retrieval.synthetic` tensors (no training; C = 2^ceil(log2(L / 100)), kappa = 1000, d = 256,
fp16 W_L) written as an index in a temporary directory (deleted afterwards). In a fresh process: `Searcher.open`
with the page cache of the index dropped, the resident memory it adds after the first searches, batch-1 p50/p99
over distinct `synthetic_queries` (embeddings given) and queries/s at batch 256. Then faiss HNSW
(`elias_retrieval.baseline.AnnBaseline`) over the same W_L and b_L, in its own process: build time, resident
memory, the same latencies.

Recall@100 on a sample of queries, each method against its own exact answer:
  * ELIAS (beam search) against the exhaustive ELIAS top-100: every cluster and every label scored,
    path x sigmoid(w . phi + b) (`exhaustive_topk`, the scoring functions of `elias_retrieval.search`);
  * HNSW against the exact top-100 by w . phi + b, the score it ranks by (and, for reference, against the
    exhaustive ELIAS top-100).
HNSW is timed at efSearch = k and at the smallest efSearch of an upward sweep whose recall against its exact
answer is at least ELIAS's against its own ("equal recall").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import (  # noqa: E402
    BENCHMARKS,
    ceiling_line,
    command_line,
    machine,
    machine_ceiling,
    parse_args,
    percentiles,
    time_each,
    today,
    write_section,
)

from elias_retrieval.search import SearchTensors, cluster_scores, label_logits  # noqa: E402

SECTION = "## Scale sweep"
PLOT = ROOT / "docs" / "scale_latency.png"
MiB = 1 << 20
TARGET_MS = 1.0
_PROBE = "_probe"  # argv[1] of the child processes
# --quick: a few seconds, for the test suite; the numbers mean nothing.
QUICK = {"labels": "2000,5000", "kappa": 100, "dim": 32, "beam": 4, "shortlist": 200, "fast": "2:100", "queries": 50,
         "recall_queries": 20, "batch": 32, "batches": 2, "ef_construction": 40, "max_ef": 800}


def recall_at(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows of |got & ref| / |ref| (ids -1 ignored)."""
    hits = [len(set(g) & set(r) - {-1}) / max(1, len(set(r) - {-1})) for g, r in zip(got.tolist(), ref.tolist(),
                                                                                     strict=True)]
    return float(np.mean(hits))


@torch.inference_mode()
def exhaustive_topk(emb: Tensor, t: SearchTensors, k: int, max_elems: int = 1 << 25) -> tuple[Tensor, Tensor]:
    """Exact top-k label ids (B, k) of the ELIAS score over all labels, and exact top-k ids by w . phi + b.

    The ELIAS score is what `search` computes with beam = C and shortlist = L: (max over the clusters c whose
    row of A holds l of s_c * a_cl) * sigmoid(w_l . phi + b_l). Computed in chunks of at most about
    `max_elems` elements, never materialising all C * kappa candidate paths of many queries at once.
    ELIAS ids are -1 where a label is unreachable (fewer than k reachable labels).
    """
    emb = emb.float()
    B, L, C, d = emb.shape[0], t.num_labels, t.num_clusters, t.dim
    k = min(k, L)
    s_all = cluster_scores(torch.addmm(t.b_C.float(), emb, t.W_C.float().T), t.alpha)
    per_query = C * t.A_ids.shape[1]
    qc = max(1, min(B, max_elems // (L + 1)))  # queries per (qc, L + 1) path array
    sub = max(1, max_elems // per_query)  # queries per scatter of their C * kappa paths
    lb = max(k, max_elems // max(d, qc))  # W_L rows converted and multiplied at a time
    slot_ids = t.A_ids.reshape(1, -1).long()  # every cluster's slots: `expand` over all C clusters, uncopied
    out_elias, out_ip = [], []
    for a in range(0, B, qc):
        e = emb[a : a + qc]
        n = e.shape[0]
        path = torch.zeros(n, L + 1)  # column L collects the pad slots
        for i in range(0, n, sub):
            m = min(sub, n - i)
            p = (s_all[a + i : a + i + m, :, None] * t.A_weights).reshape(m, -1)  # path = s_c * a_cl
            path[i : i + m].scatter_reduce_(1, slot_ids.expand(m, -1), p, "amax")
        final = path[:, :L]
        reachable = final > 0
        ip_val = ip_ids = None
        for lo in range(0, L, lb):
            hi = min(L, lo + lb)
            rel = torch.arange(hi - lo).expand(n, -1)
            scale = None if t.W_L_scale is None else t.W_L_scale[lo:hi]
            z = label_logits(e, rel, t.W_L[lo:hi], t.b_L[lo:hi].float(), scale).float()
            final[:, lo:hi].mul_(torch.sigmoid(z))
            v, j = torch.topk(z, min(k, hi - lo), dim=1)
            if ip_val is None:
                ip_val, ip_ids = v, j + lo
            else:
                v, pick = torch.topk(torch.cat([ip_val, v], 1), k, dim=1)
                ip_val, ip_ids = v, torch.cat([ip_ids, j + lo], 1).gather(1, pick)
        final.masked_fill_(~reachable, -1.0)
        score, top = torch.topk(final, k, dim=1)
        out_elias.append(torch.where(score >= 0, top, torch.full_like(top, -1)))
        out_ip.append(ip_ids)
    return t.labels_of(torch.cat(out_elias)), t.labels_of(torch.cat(out_ip))  # type: ignore[arg-type]


def ef_schedule(k: int, max_ef: int) -> list[int]:
    """efSearch values to sweep: k, then about x sqrt(2) per step, up to max_ef."""
    out, i = [], 0
    while (ef := int(round(k * 2 ** (i / 2)))) <= max(k, max_ef):
        out.append(ef)
        i += 1
    return out


def _qps(fn: Callable[[np.ndarray], Any], queries: np.ndarray, batch: int) -> float:
    fn(queries[:batch])  # warm
    n = (len(queries) // batch - 1) * batch
    t0 = time.perf_counter()
    for i in range(batch, batch + n, batch):
        fn(queries[i : i + batch])
    return n / (time.perf_counter() - t0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _heartbeat(what: str, every: float) -> Iterator[None]:
    """Log `what` with the elapsed time every `every` seconds until the block ends (long faiss builds)."""
    done, t0 = threading.Event(), time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            _log(f"  ... {what}: {time.perf_counter() - t0:.0f} s")

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join()


# ----- the two measurements, each in a fresh process (argv: _probe elias|hnsw SPEC_JSON)


def probe_elias(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the index, time batch-1 and batch-B searches, save the top-k of the recall queries."""
    import psutil

    import elias_retrieval.encoders  # noqa: F401 - imported by Searcher.open; imports are not load time
    from elias_retrieval.search import search
    from elias_retrieval.searcher import Searcher
    from elias_retrieval.synthetic import synthetic_tensors

    torch.set_num_threads(spec["threads"])
    q = np.load(spec["queries"])
    search(torch.zeros(1, 4), synthetic_tensors(500, dim=4, kappa=50), k=5)  # warm torch's code, not the index
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    s = Searcher.open(spec["index"], device="cpu")
    open_s = time.perf_counter() - t0

    def one(e: np.ndarray) -> Any:  # beam and shortlist: the spec's, else the index defaults
        return s.search_embeddings(e, beam_size=spec.get("beam"), shortlist_size=spec.get("shortlist"))

    ts = time_each(one, q["lat"], spec["warm"])
    rss = proc.memory_info().rss - rss0  # after open and the batch-1 searches
    torch.set_num_threads(spec["batch_threads"])
    # Batch 1 again on the batch's threads (on this machine: every core), for the summary.
    ts_bt = time_each(one, q["lat"], spec["warm"]) if spec["batch_threads"] != spec["threads"] else ts
    qps = _qps(one, q["batch"], spec["batch"])
    ids = np.concatenate([one(q["rec"][i : i + 256]).ids for i in range(0, len(q["rec"]), 256)])
    np.save(spec["out_ids"], ids)
    t, p = s.tensors, s.resolve_params(beam_size=spec.get("beam"), shortlist_size=spec.get("shortlist"))
    beam, K, kappa = p.beam_size, p.shortlist_size, t.A_ids.shape[1]
    # Bytes one query must read: all of W_C and b_C, the beam's rows of A, the shortlist's rows of W_L and b_L.
    nbytes = (t.W_C.numel() * t.W_C.element_size() + 4 * t.num_clusters
              + beam * kappa * (t.A_ids.element_size() + t.A_weights.element_size())
              + K * (t.dim * t.W_L.element_size() + 4))
    p50, p99 = percentiles(ts)
    p50_bt, p99_bt = percentiles(ts_bt)
    return {"open_s": open_s, "rss": rss, "p50": p50, "p99": p99, "p50_bt": p50_bt, "p99_bt": p99_bt,
            "qps": qps, "bytes_q": nbytes,
            "flops_q": 2 * t.dim * (t.num_clusters + K), "beam": beam, "shortlist": K}


def probe_hnsw(spec: dict[str, Any]) -> dict[str, Any]:
    """Build HNSW over the index's W_L (+ b_L), sweep efSearch to equal recall, time batch 1 and batch B."""
    import faiss
    import psutil

    from elias_retrieval.baseline import AnnBaseline
    from elias_retrieval.index_format import read_index
    from elias_retrieval.label_layout import in_label_order

    ix = read_index(spec["index"])
    t = in_label_order(ix.tensors)  # the index stores rows in cluster order; HNSW ids must be label ids
    W, b = t.W_L.float().numpy(), t.b_L.float().numpy()  # fp32 copies, outside the RSS delta
    del ix, t
    gc.collect()
    q = np.load(spec["queries"])
    k, d = spec["k"], W.shape[1]
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    _log(f"  HNSW build: L={W.shape[0]:,} M={spec['M']} efConstruction={spec['ef_construction']} "
         f"with {spec['build_threads']} threads ...")
    t0 = time.perf_counter()
    with _heartbeat("building HNSW", spec["heartbeat"]):
        ann = AnnBaseline.build(W, b, "hnsw", M=spec["M"], ef_construction=spec["ef_construction"],
                                threads=spec["build_threads"])
    build_s = time.perf_counter() - t0
    _log(f"  HNSW built in {build_s:.1f} s")

    ann.threads = spec["build_threads"]  # `search` sets faiss's threads from it; recall does not depend on them
    sweep, tuned = [], None
    for ef in ef_schedule(k, spec["max_ef"]):
        ids, _ = ann.search(q["rec"], k, ef_search=ef)
        r_ip, r_ex = recall_at(ids, q["ip"]), recall_at(ids, q["ex"])
        sweep.append({"ef": ef, "r_ip": r_ip, "r_ex": r_ex})
        _log(f"  efSearch {ef}: R@{k} vs exact w.phi+b {r_ip:.4f}, vs exhaustive ELIAS {r_ex:.4f} "
             f"(target {spec['target']:.4f}) [{time.perf_counter() - t0:.1f} s]")
        if tuned is None and r_ip >= spec["target"]:
            tuned = ef
        if tuned is not None and ef >= spec["base_ef"]:
            break
    rss = proc.memory_info().rss - rss0
    by_ef = {r["ef"]: r for r in sweep}
    runs = []
    for ef in dict.fromkeys([spec["base_ef"], tuned if tuned is not None else sweep[-1]["ef"]]):
        ann.threads = spec["threads"]
        stats = faiss.cvar.hnsw_stats
        stats.reset()

        def one(e: np.ndarray, ef: int = ef) -> Any:
            return ann.search(e, k, ef_search=ef)

        ts = time_each(one, q["lat"], spec["warm"])
        ndis = stats.ndis / max(1, len(q["lat"]))  # distance computations per query
        ann.threads = spec["batch_threads"]
        qps = _qps(one, q["batch"], spec["batch"])
        p50, p99 = percentiles(ts)
        if ef not in by_ef:
            ids = one(q["rec"])[0]
            by_ef[ef] = {"r_ip": recall_at(ids, q["ip"]), "r_ex": recall_at(ids, q["ex"])}
        runs.append({"ef": ef, "p50": p50, "p99": p99, "qps": qps, "r_ip": by_ef[ef]["r_ip"],
                     "r_ex": by_ef[ef]["r_ex"], "equal_recall": ef == tuned, "base": ef == spec["base_ef"],
                     "bytes_q": ndis * (d + 1) * 4, "flops_q": ndis * 2 * (d + 1), "ndis": ndis})
        _log(f"  HNSW efSearch {ef}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, {qps:,.0f} queries/s at batch "
             f"{spec['batch']}, {ndis:,.0f} distances/query")
    return {"build_s": build_s, "rss": rss, "runs": runs, "sweep": sweep, "tuned": tuned}


def run_probe(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one probe in a fresh interpreter (progress on stderr) and return its JSON answer."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), _PROBE, kind, json.dumps(spec)],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- one L


def elias_memory(L: int, dim: int, kappa: int) -> int:
    """Rough peak bytes of one L's ELIAS part: the generated tensors plus the searcher's resident copy."""
    C = L // 50
    return 2 * (L * (2 * dim + 4) + C * kappa * 12 + C * dim * 4) + (1 << 30)


def hnsw_memory(L: int, dim: int, M: int) -> int:
    """Rough peak bytes of the HNSW probe: the fp32 W_L, faiss's own copy (+ a transient one) and the graph."""
    return 3 * L * (dim + 1) * 4 + L * 2 * M * 4 * 2 + (1 << 30)


def measure(L: int, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """All rows (ELIAS, HNSW at efSearch = k and at equal recall) for one label count; files go in `work`."""
    import psutil

    from elias_retrieval.data import LabelVocab
    from elias_retrieval.index_format import drop_page_cache, index_size, write_index
    from elias_retrieval.synthetic import default_num_clusters, synthetic_queries, synthetic_tensors

    C = default_num_clusters(L)
    t0 = time.perf_counter()
    t = synthetic_tensors(L, dim=args.dim, kappa=args.kappa, num_clusters=C, seed=0, dtype="fp16")
    gen_s = time.perf_counter() - t0
    index_dir = work / "index"
    defaults = {"k": args.k, "beam_size": min(args.beam, C), "shortlist_size": args.shortlist}
    t0 = time.perf_counter()
    write_index(index_dir, t, LabelVocab([str(i) for i in range(L)], []), None, dtype="fp16", defaults=defaults,
                meta={"synthetic": True})
    write_s = time.perf_counter() - t0
    disk = sum(index_size(index_dir).values())
    _log(f"L={L:,} C={C:,} kappa={t.A_ids.shape[1]} d={t.dim}: generated in {gen_s:.1f} s, index written in "
         f"{write_s:.1f} s ({disk / MiB:,.1f} MiB)")

    n_lat = args.warm + args.queries
    q_lat = synthetic_queries(t, n_lat, seed=1)[0]
    q_batch = synthetic_queries(t, (args.batches + 1) * args.batch, seed=2)[0]
    q_rec = synthetic_queries(t, args.recall_queries, seed=3)[0]
    t0 = time.perf_counter()
    ex_ids, ip_ids = exhaustive_topk(q_rec, t, args.k)
    _log(f"  exhaustive ELIAS and exact w.phi+b top-{args.k} of {len(q_rec)} queries in "
         f"{time.perf_counter() - t0:.1f} s")
    qfile = work / "queries.npz"
    np.savez(qfile, lat=q_lat.numpy(), batch=q_batch.numpy(), rec=q_rec.numpy(), ex=ex_ids.numpy(),
             ip=ip_ids.numpy())
    kappa = int(t.A_ids.shape[1])
    del t
    gc.collect()

    spec = {"index": str(index_dir), "queries": str(qfile), "threads": args.threads,
            "batch_threads": args.batch_threads, "warm": args.warm, "batch": args.batch, "k": args.k}
    drop_page_cache(index_dir)
    el = run_probe("elias", spec | {"out_ids": str(work / "elias-ids.npy")})
    got = np.load(work / "elias-ids.npy")
    el["r_ex"], el["r_ip"] = recall_at(got, ex_ids.numpy()), recall_at(got, ip_ids.numpy())
    _log(f"  ELIAS: open {el['open_s']:.2f} s, RSS +{el['rss'] / MiB:,.0f} MiB, p50 {el['p50']:.3f} ms, "
         f"p99 {el['p99']:.3f} ms, {el['qps']:,.0f} queries/s at batch {args.batch}, R@{args.k} vs exhaustive "
         f"{el['r_ex']:.4f}")
    common = {"L": L, "C": C, "kappa": kappa}
    rows = [common | el | {"method": f"ELIAS (beam {el['beam']}, K {el['shortlist']})",
                           "build": f"{gen_s:.1f} + {write_s:.1f}", "disk": disk, "kind": "elias"}]
    if args.fast:
        beam, K = (int(x) for x in args.fast.split(":"))
        drop_page_cache(index_dir)
        fa = run_probe("elias", spec | {"out_ids": str(work / "fast-ids.npy"), "beam": min(beam, C), "shortlist": K})
        got = np.load(work / "fast-ids.npy")
        fa["r_ex"], fa["r_ip"] = recall_at(got, ex_ids.numpy()), recall_at(got, ip_ids.numpy())
        _log(f"  ELIAS beam {fa['beam']}, K {fa['shortlist']}: p50 {fa['p50']:.3f} ms, p99 {fa['p99']:.3f} ms, "
             f"{fa['qps']:,.0f} queries/s, R@{args.k} vs exhaustive {fa['r_ex']:.4f}")
        rows.append(common | fa | {"method": f"ELIAS (beam {fa['beam']}, K {fa['shortlist']})",
                                   "build": f"{gen_s:.1f} + {write_s:.1f}", "disk": disk, "kind": "elias-fast"})
    if args.hnsw_max_labels < L:
        _log(f"  HNSW skipped (L > --hnsw-max-labels {args.hnsw_max_labels:,})")
        return rows
    if (need := hnsw_memory(L, args.dim, args.hnsw_m)) > (avail := psutil.virtual_memory().available):
        _log(f"  HNSW skipped: needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
        return rows
    hn = run_probe("hnsw", spec | {"M": args.hnsw_m, "ef_construction": args.ef_construction,
                                   "build_threads": args.build_threads, "max_ef": args.max_ef, "heartbeat": 30,
                                   "base_ef": args.ef_search or args.k, "target": el["r_ex"]})
    for r in hn["runs"]:
        notes = (["untuned"] if r["base"] else []) + (["equal recall"] if r["equal_recall"] else [])
        if hn["tuned"] is None and r["ef"] == hn["sweep"][-1]["ef"]:
            notes.append("largest efSearch swept, below ELIAS's recall")
        rows.append(common | r | {"method": f"HNSW (M {args.hnsw_m}, efSearch {', '.join([str(r['ef']), *notes])})",
                                  "build": f"{hn['build_s']:.1f}", "disk": None, "open_s": None, "rss": hn["rss"],
                                  "kind": "hnsw", "sweep": hn["sweep"]})
    return rows


# ----- report


def _pct(x: float, ceiling: float) -> str:
    return f"{100 * x / ceiling:.1f}%" if ceiling > 0 else "?"


def table(rows: list[dict[str, Any]], ceil: dict[str, float], args: argparse.Namespace) -> list[str]:
    bw = ceil["bandwidth_1t" if args.threads == 1 else "bandwidth"]
    gemm = ceil["gemm_flops_1t" if args.batch_threads == 1 else "gemm_flops"]
    k = args.k
    lines = [
        f"| L | C | method | build (s) | on disk (MiB) | load (s) | RSS (MiB) | p50 (ms) | p99 (ms) | "
        f"queries/s, batch {args.batch} | R@{k} vs exhaustive ELIAS | R@{k} vs exact w.phi+b | "
        f"batch 1: bytes read / p50, GB/s (vs bandwidth) | batch {args.batch}: GFLOP/s (vs GEMM) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        gbs = r["bytes_q"] / (r["p50"] / 1e3)
        flops = r["flops_q"] * r["qps"]
        disk = "—" if r["disk"] is None else f"{r['disk'] / MiB:,.1f}"
        load = "—" if r["open_s"] is None else f"{r['open_s']:.2f}"
        lines.append(
            f"| {r['L']:,} | {r['C']:,} | {r['method']} | {r['build']} | {disk} | {load} | {r['rss'] / MiB:,.0f} | "
            f"{r['p50']:.3f} | {r['p99']:.3f} | {r['qps']:,.0f} | {r['r_ex']:.4f} | {r['r_ip']:.4f} | "
            f"{gbs / 1e9:.2f} ({_pct(gbs, bw)}) | {flops / 1e9:.1f} ({_pct(flops, gemm)}) |")
    return lines


def summary(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The conclusions, computed from the rows: ELIAS at L = 1M (or the largest L run) against the 1 ms target
    and against HNSW at equal recall, and how each p50 grows with L."""
    Ls = sorted({r["L"] for r in rows})
    at = 1_000_000 if 1_000_000 in Ls else Ls[-1]
    el = next(r for r in rows if r["L"] == at and r["kind"] == "elias")
    verdict = "meets" if el["p50"] <= TARGET_MS else "misses"
    out = [f"At L = {at:,}{'' if at == 1_000_000 else ' (the largest L of this run)'}: ELIAS batch-1 p50 = "
           f"{el['p50']:.3f} ms, which {verdict} the {TARGET_MS:g} ms target ({el['p50'] / TARGET_MS:.2f}x of it); "
           f"R@{args.k} against the exhaustive ELIAS top-{args.k} = {el['r_ex']:.4f}."]
    if args.batch_threads != args.threads:
        verdict = "meets" if el["p50_bt"] <= TARGET_MS else "misses"
        out.append(f"The same batch-1 queries with {args.batch_threads} torch threads: p50 = {el['p50_bt']:.3f} ms "
                   f"({verdict} the target), p99 = {el['p99_bt']:.3f} ms.")
    fast = next((r for r in rows if r["L"] == at and r["kind"] == "elias-fast"), None)
    if fast is not None:
        verdict = "meets" if fast["p50"] <= TARGET_MS else "misses"
        out.append(f"At beam {fast['beam']}, K {fast['shortlist']}: p50 = {fast['p50']:.3f} ms ({verdict} the "
                   f"target), p99 = {fast['p99']:.3f} ms, R@{args.k} against the exhaustive top-{args.k} = "
                   f"{fast['r_ex']:.4f}.")
    hn = [r for r in rows if r["L"] == at and r["kind"] == "hnsw"]
    eq = next((r for r in hn if r["equal_recall"]), None)
    if eq is not None:
        ratio = eq["p50"] / el["p50"]
        faster = f"ELIAS is {ratio:.2f}x faster" if ratio >= 1 else f"HNSW is {1 / ratio:.2f}x faster"
        out.append(f"HNSW at equal recall (efSearch {eq['ef']}: R@{args.k} against its exact w.phi+b top-{args.k} "
                   f"= {eq['r_ip']:.4f} >= ELIAS's {el['r_ex']:.4f} against its own) has p50 = {eq['p50']:.3f} ms: "
                   f"{faster} at batch 1. At batch {args.batch}: ELIAS {el['qps']:,.0f} queries/s, HNSW "
                   f"{eq['qps']:,.0f}.")
    elif hn:
        best = max(hn, key=lambda r: r["ef"])
        out.append(f"HNSW did not reach ELIAS's recall by efSearch {best['ef']} (R@{args.k} against its exact "
                   f"answer {best['r_ip']:.4f} < {el['r_ex']:.4f}); there its p50 = {best['p50']:.3f} ms, "
                   f"{best['p50'] / el['p50']:.2f}x ELIAS's.")
    else:
        out.append("HNSW was not run at this L.")
    if len(Ls) > 1:
        lo, hi = Ls[0], Ls[-1]

        def growth(pick: Callable[[dict[str, Any]], bool]) -> str | None:
            a = next((r for r in rows if r["L"] == lo and pick(r)), None)
            b = next((r for r in rows if r["L"] == hi and pick(r)), None)
            if a is None or b is None:
                return None
            return f"{a['p50']:.3f} -> {b['p50']:.3f} ms ({b['p50'] / a['p50']:.2f}x)"

        parts = [f"ELIAS {growth(lambda r: r['kind'] == 'elias')}"]
        if g := growth(lambda r: r["kind"] == "hnsw" and r["equal_recall"]):
            parts.append(f"HNSW at equal recall {g}")
        out.append(f"From L = {lo:,} to {hi:,} ({hi / lo:,.0f}x the labels), batch-1 p50: {'; '.join(parts)}.")
    return " ".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p50 latency against L (log x): ELIAS, HNSW at efSearch = k and at equal recall; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elias_retrieval.atomic import write_bytes

    fast = next((r for r in rows if r["kind"] == "elias-fast"), None)
    curves = [("ELIAS", lambda r: r["kind"] == "elias", "o-"),
              (f"ELIAS, beam {fast['beam']}, K {fast['shortlist']}" if fast else "",
               lambda r: r["kind"] == "elias-fast", "o:"),
              ("HNSW, efSearch = k", lambda r: r["kind"] == "hnsw" and r["base"], "s--"),
              ("HNSW, equal recall", lambda r: r["kind"] == "hnsw" and r["equal_recall"], "^-")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pick, style in curves:
        pts = sorted((r["L"], r["p50"]) for r in rows if pick(r))
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.axhline(TARGET_MS, color="grey", linestyle=":", label=f"{TARGET_MS:g} ms target")
    ax.set_xscale("log")
    Ls = sorted({r["L"] for r in rows})
    ax.set_xticks(Ls, [f"{L / 1e6:g}M" if L >= 10**6 else f"{L / 1e3:g}k" if L >= 1000 else str(L) for L in Ls])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("labels L")
    ax.set_ylabel("batch-1 p50 latency (ms)")
    ax.set_title("Search latency against the number of labels (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def report(rows: list[dict[str, Any]], ceil: dict[str, float], desc: str, args: argparse.Namespace) -> str:
    k = args.k
    sweeps = []
    for L in sorted({r["L"] for r in rows}):
        sw = next((r["sweep"] for r in rows if r["L"] == L and r["kind"] == "hnsw"), None)
        if sw:
            sweeps.append(f"L = {L:,}: " + ", ".join(f"{s['ef']}: {s['r_ip']:.3f} / {s['r_ex']:.3f}" for s in sw))
    lines = [
        f"Synthetic indexes (`elias_retrieval.synthetic`, no training): C = 2^ceil(log2(L / 100)), kappa = "
        f"{args.kappa}, d = {args.dim}, fp16 W_L and W_C; k = {k}, beam = {args.beam}, K = {args.shortlist}"
        f"{f' (and a second ELIAS row at beam:K = {args.fast})' if args.fast else ''}; embeddings "
        f"given; CPU. Batch 1: p50/p99 over {args.queries} distinct `synthetic_queries` per method, torch threads = "
        f"faiss OpenMP threads = {args.threads}; batch {args.batch}: {args.batch_threads} threads. faiss HNSW "
        f"(`AnnBaseline`, inner product with the bias) over the same W_L and b_L: M = {args.hnsw_m}, "
        f"efConstruction = {args.ef_construction}, built with {args.build_threads} threads. Machine: {desc}. "
        f"Date: {today()}. Command: `{command_line()}`.",
        "",
        ceiling_line(ceil),
        "",
        *table(rows, ceil, args),
        "",
        f"What is compared. ELIAS's R@{k}: its beam search against the exhaustive ELIAS top-{k} (every cluster, "
        f"every label: best path x sigmoid(w.phi + b)) on {args.recall_queries} queries. HNSW ranks by w.phi + b, "
        f"not by the ELIAS score, so its R@{k} is given against the exact top-{k} by w.phi + b (its own exact "
        f"answer) and, for reference, against the exhaustive ELIAS top-{k}. \"Equal recall\" = the smallest "
        f"efSearch of the sweep (k, then x sqrt(2) per step, up to {args.max_ef}) whose R@{k} against its own exact "
        f"answer is >= ELIAS's against its own.",
        "",
        "Columns. Build: ELIAS = synthetic generation + `write_index` (fp16 W_L, fsync, sha256); HNSW = "
        "`AnnBaseline.build`. Load: `Searcher.open` with the index's pages dropped from the page cache (it makes "
        "resident copies, so it reads the whole file). RSS: resident memory added by opening (HNSW: building, not "
        "counting the fp32 W_L it is built from) and the first searches, in a fresh process. Bytes read per query: "
        "ELIAS = W_C + b_C + the beam's kappa slots of A + the K shortlisted rows of W_L and b_L; HNSW = distance "
        "computations per query (faiss `hnsw_stats`) x (d + 1) x 4 bytes. FLOPs per query: ELIAS 2d(C + K), HNSW "
        f"2(d + 1) per distance. The bandwidth and GEMM fractions are against the ceiling at {args.threads} and "
        f"{args.batch_threads} thread(s).",
        "",
    ]
    if sweeps:
        lines += [f"efSearch sweep (efSearch: R@{k} vs exact w.phi+b / vs exhaustive ELIAS): " + "; ".join(sweeps)
                  + ".", ""]
    lines.append(summary(rows, args))
    return "\n".join(lines)


def _probe_main(argv: list[str]) -> None:
    kind, spec = argv[0], json.loads(argv[1])
    res = probe_elias(spec) if kind == "elias" else probe_hnsw(spec)
    print(json.dumps(res))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == _PROBE:
        _probe_main(sys.argv[2:])
        return
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="10000,100000,1000000", help="comma-separated label counts L")
    ap.add_argument("--kappa", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--shortlist", type=int, default=2000)
    ap.add_argument("--fast", default="5:500", help="a second, cheaper ELIAS operating point as beam:shortlist "
                    "(its own row at each L; '' for none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads = faiss OpenMP threads at batch 1")
    ap.add_argument("--batch-threads", type=int, default=cores, help="threads at batch --batch")
    ap.add_argument("--build-threads", type=int, default=cores, help="faiss threads for the HNSW build and sweep")
    ap.add_argument("--queries", type=int, default=1000, help="timed batch-1 queries per method and L")
    ap.add_argument("--warm", type=int, default=20, help="untimed batch-1 queries first")
    ap.add_argument("--recall-queries", type=int, default=100, help="queries scored exhaustively for recall")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="timed batches for queries/s")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef-search", type=int, default=None, help="efSearch of the untuned HNSW row (default k)")
    ap.add_argument("--max-ef", type=int, default=4096, help="largest efSearch of the equal-recall sweep")
    ap.add_argument("--hnsw-max-labels", type=int, default=1_000_000, help="skip HNSW above this L (slow build)")
    ap.add_argument("--work-dir", default=None, help="where the temporary indexes go (default: the system temp)")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes, a few seconds ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    ap.add_argument("--plot", type=Path, default=PLOT, help="where the latency plot goes (PNG)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and the plot alone")
    args = parse_args(ap, QUICK)
    labels = sorted({int(x) for x in str(args.labels).split(",") if x.strip()})
    desc = machine()  # before the run: the load average says whether the machine was quiet
    ceil = machine_ceiling(512, 32) if args.quick else machine_ceiling()
    _log(ceiling_line(ceil))

    import psutil

    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="elias-scale-", dir=args.work_dir))
    try:
        for L in labels:
            if (need := elias_memory(L, args.dim, args.kappa)) > (avail := psutil.virtual_memory().available):
                _log(f"L={L:,} skipped: needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
                continue
            t0 = time.perf_counter()
            (work / str(L)).mkdir()
            rows += measure(L, args, work / str(L))
            shutil.rmtree(work / str(L))  # the index and the query files
            _log(f"L={L:,} done in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not rows:
        raise SystemExit("no label count fitted in memory")
    text = report(rows, ceil, desc, args)
    if args.no_write:
        print(text)
        return
    plot(rows, args.plot)
    rel = os.path.relpath(args.plot.resolve(), args.benchmarks_file.resolve().parent)
    write_section(SECTION, text + f"\n\n![batch-1 p50 latency against L]({rel})", args.benchmarks_file)
    print(text)
    print(f"wrote {SECTION!r} in {args.benchmarks_file} and the plot {args.plot}")


if __name__ == "__main__":
    main()
