"""In-process search latency and throughput on a synthetic ELIAS index (BENCHMARKS.md, "In-process search latency").

    .venv/bin/python bench/search_latency.py                   # 1M labels, C=16384, kappa=1000, d=256, fp16 W_L
    .venv/bin/python bench/search_latency.py --labels 100000 --no-write
    .venv/bin/python bench/search_latency.py --quick --benchmarks-file /tmp/B.md   # tiny smoke run (the tests)
    python bench/search_latency.py --device cuda --benchmarks-file runs/gpu-check/BENCHMARKS.md  # on a GPU

Embeddings are given (no encoder). Batch 1: p50/p99 of `Searcher.search_embeddings` over distinct random
queries, with 1 and 2 torch threads; then, at 1 thread, the same for a few (beam, shortlist) operating points
with each point's R@100 against the exhaustive ELIAS top-100 (every cluster and label scored). Batch 256:
queries/s, and the FLOP/s that the W_C GEMM and the W_L shortlist products reach as a fraction of this
machine's measured fp32 GEMM FLOP/s. Labels are stored in cluster order, as an index stores them; an A/B
table times the same searches with label-id order. With `--device DEV` (e.g. cuda), a shorter table of its own:
the index on DEV, batch-1 p50/p99, the operating points with their recall, and batch-256 queries/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (  # noqa: E402
    BENCHMARKS,
    accelerator,
    add_index_args,
    ceiling_line,
    command_line,
    machine,
    machine_ceiling,
    parse_args,
    percentiles,
    time_each,
    time_interleaved,
    today,
    write_section,
)

from elias_retrieval.label_layout import in_cluster_order  # noqa: E402
from elias_retrieval.search import (  # noqa: E402
    SearchTensors,
    best_paths,
    cluster_logits,
    cluster_scores,
    expand,
    label_logits,
    search,
    shortlist,
)
from elias_retrieval.searcher import Searcher, resident_copy  # noqa: E402
from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors  # noqa: E402

SECTION = "## In-process search latency"
# --quick: a few seconds, for the test suite; the numbers mean nothing.
QUICK = {"labels": 10_000, "clusters": 128, "kappa": 100, "dim": 32, "shortlist": 500, "queries": 100, "batch": 32,
         "batches": 2, "points": [(20, 500), (5, 200)], "recall_queries": 20}
# (beam, shortlist) operating points timed at batch 1 with their recall against the exhaustive top-k.
POINTS = [(20, 2000), (10, 1000), (5, 500), (5, 200)]


def gemm_peak(dim: int, C: int, batch: int = 256, reps: int = 10) -> float:
    """Best fp32 GEMM FLOP/s of (batch, d) x (d, C) on this machine (the W_C shape)."""
    a, b = torch.randn(batch, dim), torch.randn(dim, C)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * dim * C / best


STAGES = ("W_C product", "cluster softmax + beam", "expand beam rows of A", "best path per label (dedupe)",
          "W_L on the shortlist", "final top-k")


@torch.inference_mode()
def stage_times(t, embs: torch.Tensor, k: int, beam: int, K: int) -> dict[str, float]:
    """Median ms of each step of `search` at batch 1 (the same calls, timed one by one)."""
    times: dict[str, list[float]] = {name: [] for name in STAGES}
    L = t.num_labels
    for e in embs:
        e = e[None]
        t0 = time.perf_counter()
        logits = cluster_logits(e, t)
        t1 = time.perf_counter()
        sc = cluster_scores(logits, t.alpha)
        clusters = torch.topk(sc, beam, dim=1).indices
        t2 = time.perf_counter()
        cand_ids, cand_path = expand(clusters, sc.gather(1, clusters), t.A_ids, t.A_weights)
        t3 = time.perf_counter()
        pos, valid = best_paths(cand_ids, cand_path, K, L)
        ids, path = cand_ids.gather(1, pos), cand_path.gather(1, pos) * valid
        t4 = time.perf_counter()
        z = label_logits(e, torch.where(valid, ids, torch.zeros_like(ids)).clamp_(max=L - 1), t.W_L, t.b_L,
                         t.W_L_scale)
        t5 = time.perf_counter()
        torch.topk(torch.where(valid, path * torch.sigmoid(z), -1.0), k, dim=1)
        t6 = time.perf_counter()
        for name, a, b in zip(STAGES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6), strict=True):
            times[name].append(b - a)
    return {name: float(np.median(v)) * 1e3 for name, v in times.items()}


def parse_points(v: str) -> list[tuple[int, int]]:
    """"20:2000,10:1000" -> [(20, 2000), (10, 1000)]."""
    return [(int(b), int(k)) for b, k in (p.split(":") for p in v.split(","))]


def operating_points(s: Searcher, points: list[tuple[int, int]], n_lat: int, n_rec: int, k: int,
                     t: SearchTensors | None = None) -> list[dict]:
    """Batch-1 p50/p99 (1 thread) and R@k against the exhaustive ELIAS top-k, per (beam, shortlist); queries and
    the exhaustive top-k come from `t` (CPU tensors of the same index; default: the searcher's own)."""
    from scale import exhaustive_topk, recall_at

    t = s.tensors if t is None else t
    rec_q = synthetic_queries(t, n_rec, seed=11)[0]
    t0 = time.perf_counter()
    exact = exhaustive_topk(rec_q, t, k)[0].numpy()
    print(f"exhaustive top-{k} of {n_rec} queries in {time.perf_counter() - t0:.1f} s", flush=True)
    lat_q = synthetic_queries(t, n_lat + 50, seed=12)[0].numpy()
    times = time_interleaved({(beam, K): lambda q, beam=beam, K=K: s.search_embeddings(
        q, k=k, beam_size=beam, shortlist_size=K) for beam, K in points}, lat_q, 50)
    out = []
    for beam, K in points:
        got = np.concatenate([s.search_embeddings(rec_q[i : i + 64].numpy(), k=k, beam_size=beam,
                                                  shortlist_size=K).ids for i in range(0, n_rec, 64)])
        p50, p99 = percentiles(times[beam, K])
        out.append({"beam": beam, "shortlist": K, "p50": p50, "p99": p99, "recall": recall_at(got, exact)})
        print(f"beam {beam}, shortlist {K}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, R@{k} vs exhaustive "
              f"{out[-1]['recall']:.4f}", flush=True)
    return out


def cluster_storage_ab(s: Searcher, queries: np.ndarray, k: int) -> dict[str, tuple[float, float]] | None:
    """Batch-1 p50/p99 of the same search with W_C as a compact index stores it (fp16, fbgemm's fp16 x fp32
    product) and as a version-1 index did (fp32, MKL), interleaved query by query; None without fbgemm."""
    t = s.tensors
    if t.W_C_packed is None:
        return None
    fp32 = dataclasses.replace(t, W_C=resident_copy(t.W_C.T.float().contiguous()).T, W_C_packed=None)
    p = s.defaults
    run = lambda tensors: lambda q: search(torch.from_numpy(q), tensors, k, p["beam_size"], p["shortlist_size"])  # noqa: E731
    times = time_interleaved({"fp16 W_C, fbgemm fp16 x fp32": run(t), "fp32 W_C, MKL fp32": run(fp32)}, queries, 50)
    return {name: percentiles(ts) for name, ts in times.items()}


def label_order_ab(s: Searcher, by_id, queries: np.ndarray, k: int, points: list[tuple[int, int]]) -> dict:
    """Batch-1 p50/p99 of the same searches with the labels stored in cluster order (as an index stores them)
    and in label-id order (`by_id`, the same tensors otherwise), interleaved query by query, per point."""
    run = lambda tensors, b, K: lambda q: search(torch.from_numpy(q), tensors, k, b, K)  # noqa: E731
    fns = {}
    for b, K in points:
        fns[("cluster order", b, K)] = run(s.tensors, b, K)
        fns[("label-id order", b, K)] = run(by_id, b, K)
    return {key: percentiles(ts) for key, ts in time_interleaved(fns, queries, 50).items()}


def device_main(args: argparse.Namespace) -> None:
    """`--device DEV`: batch-1 p50/p99, the operating points with their recall, and batch-B queries/s, with the
    index on DEV. Queries go in as numpy and results come back as numpy (what a server does), so each timing
    includes the copies; batch B is also timed with the queries already on DEV and the results left there."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: torch sees no CUDA device", file=sys.stderr)
        sys.exit(2)
    machine_desc, gpu = machine(), accelerator(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    cpu = in_cluster_order(synthetic_tensors(args.labels, dim=args.dim, kappa=args.kappa, num_clusters=args.clusters,
                                            seed=0))
    s = Searcher(cpu, None, None, {"defaults": {"k": args.k, "beam_size": args.beam,
                                                "shortlist_size": args.shortlist}}, device=device, resident=False)
    print(f"index on {device} ({gpu}): L={cpu.num_labels:,} C={cpu.num_clusters:,} kappa={cpu.A_ids.shape[1]} "
          f"d={cpu.dim} W_L {cpu.W_L.dtype}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    embs = synthetic_queries(cpu, args.queries + 50, seed=1)[0].numpy()
    p50, p99 = percentiles(time_each(s.search_embeddings, embs, 50))
    print(f"batch 1: p50 {p50:.3f} ms, p99 {p99:.3f} ms", flush=True)
    points = operating_points(s, args.points, min(args.queries, 500), args.recall_queries, args.k, t=cpu)
    B = args.batch
    batches = synthetic_queries(cpu, (args.batches + 1) * B, seed=3)[0].reshape(args.batches + 1, B, args.dim)
    s.search_embeddings(batches[0].numpy())
    t1 = time.perf_counter()
    for e in batches[1:]:
        s.search_embeddings(e.numpy())
    qps = args.batches * B / (time.perf_counter() - t1)
    on_device = batches.to(device)
    with torch.inference_mode():
        search(on_device[0], s.tensors, args.k, args.beam, args.shortlist)
        sync()
        t1 = time.perf_counter()
        for e in on_device[1:]:
            search(e, s.tensors, args.k, args.beam, args.shortlist)
        sync()
    qps_resident = args.batches * B / (time.perf_counter() - t1)
    print(f"batch {B}: {qps:,.0f} queries/s with the copies, {qps_resident:,.0f} with queries and results on "
          f"{device}", flush=True)
    if args.no_write:
        return
    title = f"{SECTION} ({device.type})"
    lines = [
        f"Synthetic index on `{device}`: L = {cpu.num_labels:,}, C = {cpu.num_clusters:,}, kappa = "
        f"{cpu.A_ids.shape[1]}, d = {cpu.dim}, W_L {str(cpu.W_L.dtype).removeprefix('torch.')}, k = {args.k}, "
        f"beam = {args.beam}, shortlist = {args.shortlist}; embeddings given. Device: {gpu}. "
        f"Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.", "",
        "| batch | p50 (ms) | p99 (ms) | queries/s |", "| --- | ---: | ---: | ---: |",
        f"| 1 | {p50:.3f} | {p99:.3f} | {1e3 / p50:,.0f} |",
        f"| {B} | | | {qps:,.0f} |",
        f"| {B}, queries and results left on `{device}` | | | {qps_resident:,.0f} |",
        "", "Batch 1 and the first batch row time `Searcher.search_embeddings` from numpy to numpy, copies included.",
        "", f"Batch-1 operating points, each (beam, shortlist)'s latency and its R@{args.k} against the exhaustive "
        f"ELIAS top-{args.k} (computed on the CPU; {args.recall_queries} queries):", "",
        f"| beam | shortlist | p50 (ms) | p99 (ms) | R@{args.k} vs exhaustive |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {p['beam']} | {p['shortlist']:,} | {p['p50']:.3f} | {p['p99']:.3f} | {p['recall']:.4f} |"
              for p in points]
    write_section(title, "\n".join(lines), args.benchmarks_file)
    print(f"wrote {title!r} in {args.benchmarks_file}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_index_args(ap)
    ap.add_argument("--queries", type=int, default=2000, help="batch-1 queries timed per thread count")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--points", type=parse_points, default=POINTS,
                    help="batch-1 operating points as beam:shortlist,... (default: %(default)s)")
    ap.add_argument("--recall-queries", type=int, default=200, help="queries scored exhaustively for R@k")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes, a few seconds ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--device", help="search on this torch device (cuda, cpu): a shorter table of its own, "
                    f"section '{SECTION} (DEVICE)'; without it, the full CPU study")
    args = parse_args(ap, QUICK)
    if args.device:
        return device_main(args)
    machine_desc = machine()  # before the run: the load average says whether the machine was quiet
    ceiling = machine_ceiling()

    t0 = time.perf_counter()
    raw = synthetic_tensors(args.labels, dim=args.dim, kappa=args.kappa, num_clusters=args.clusters, seed=0)
    # Labels in cluster order, as write_index stores them; `by_id` keeps label-id order for the A/B below.
    s = Searcher(in_cluster_order(raw), None, None, {"defaults": {"k": args.k, "beam_size": args.beam,
                                                                 "shortlist_size": args.shortlist}}, device="cpu")
    by_id = Searcher._prepare(raw, torch.device("cpu"), resident=True)
    t = s.tensors
    del raw
    print(f"index: L={t.num_labels:,} C={t.num_clusters:,} kappa={t.A_ids.shape[1]} d={t.dim} "
          f"W_L {t.W_L.dtype}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        embs = synthetic_queries(t, args.queries + 50, seed=threads)[0].numpy()  # each near a label
        p50, p99 = percentiles(time_each(s.search_embeddings, embs, 50))
        rows.append((threads, p50, p99))
        print(f"batch 1, {threads} thread(s): p50 {p50:.3f} ms, p99 {p99:.3f} ms", flush=True)

    torch.set_num_threads(1)
    points = operating_points(s, args.points, min(args.queries, 500), args.recall_queries, args.k)
    ab = cluster_storage_ab(s, synthetic_queries(t, min(args.queries, 500) + 50, seed=13)[0].numpy(), args.k)
    if ab:
        print("batch 1, 1 thread, W_C storage: " + ", ".join(f"{n} p50 {v[0]:.3f} ms" for n, v in ab.items()))
    order_points = list(dict.fromkeys([(args.beam, args.shortlist), args.points[-2]]))
    order = label_order_ab(s, by_id, synthetic_queries(t, min(args.queries, 500) + 50, seed=14)[0].numpy(), args.k,
                           order_points)
    del by_id
    print("batch 1, 1 thread, label order: " + ", ".join(f"{n} beam {b} K {K} p50 {v[0]:.3f} ms"
                                                          for (n, b, K), v in order.items()))
    stages = stage_times(t, synthetic_queries(t, min(args.queries, 500), seed=7)[0], args.k, args.beam,
                         args.shortlist)
    print("batch 1, 1 thread, median ms per step: " + ", ".join(f"{n} {v:.3f}" for n, v in stages.items()))
    torch.set_num_threads(2)
    B = args.batch
    peak = gemm_peak(args.dim, t.num_clusters, B)
    embs = synthetic_queries(t, (args.batches + 1) * B, seed=3)[0].reshape(args.batches + 1, B, args.dim)
    s.search_embeddings(embs[0])
    t1 = time.perf_counter()
    for e in embs[1:]:
        s.search_embeddings(e)
    qps = args.batches * B / (time.perf_counter() - t1)
    # The same batches in one part and in a part per thread, interleaved batch by batch.
    split: dict[int, float] = {1: 0.0, 2: 0.0}
    for i, e in enumerate(embs[1:]):
        for parts in (1, 2) if i % 2 else (2, 1):
            t1 = time.perf_counter()
            search(e, t, args.k, args.beam, args.shortlist, parts=parts)
            split[parts] += time.perf_counter() - t1
    qps_split = {parts: args.batches * B / v for parts, v in split.items()}
    print(f"batch {B}, 2 threads: one part {qps_split[1]:,.0f} queries/s, two parts side by side "
          f"{qps_split[2]:,.0f} ({qps_split[2] / qps_split[1]:.2f}x)", flush=True)
    # The two matrix products, timed on their own inside the same search.
    t_wc = t_wl = 0.0
    with torch.inference_mode():
        for e in embs[1:]:
            t1 = time.perf_counter()
            logits = cluster_logits(e, t)
            t_wc += time.perf_counter() - t1
            ids, _, _, valid = shortlist(cluster_scores(logits, t.alpha), t.A_ids, t.A_weights, args.beam,
                                         args.shortlist, t.num_labels)
            ids = torch.where(valid, ids, torch.zeros_like(ids))
            t1 = time.perf_counter()
            label_logits(e, ids, t.W_L, t.b_L, t.W_L_scale)
            t_wl += time.perf_counter() - t1
    n = args.batches
    f_wc, f_wl = 2 * B * t.num_clusters * t.dim, 2 * B * args.shortlist * t.dim
    frac = (f_wc + f_wl) * n / (t_wc + t_wl) / peak
    print(f"batch {B}, 2 threads: {qps:,.0f} queries/s; GEMM peak {peak / 1e9:.0f} GFLOP/s; "
          f"W_C {f_wc * n / t_wc / 1e9:.0f} GFLOP/s ({1e3 * t_wc / n:.1f} ms/batch), "
          f"W_L {f_wl * n / t_wl / 1e9:.1f} GFLOP/s ({1e3 * t_wl / n:.1f} ms/batch); W_C+W_L {100 * frac:.0f}% of peak")

    if args.no_write:
        return
    setup = (f"L = {t.num_labels:,}, C = {t.num_clusters:,}, kappa = {t.A_ids.shape[1]}, d = {t.dim}, "
             f"W_L {str(t.W_L.dtype).removeprefix('torch.')}, k = {args.k}, beam = {args.beam}, "
             f"shortlist = {args.shortlist}; labels stored in cluster order; embeddings given; CPU")
    lines = [
        f"Synthetic index: {setup}. Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.", "",
        "| batch | torch threads | p50 (ms) | p99 (ms) | queries/s | W_C + W_L FLOP/s vs GEMM peak |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for threads, p50, p99 in rows:
        lines.append(f"| 1 | {threads} | {p50:.3f} | {p99:.3f} | {1e3 / p50:,.0f} | |")
    lines.append(f"| {B} | 2 | | | {qps:,.0f} | {100 * frac:.0f}% (W_C {f_wc * n / t_wc / 1e9:.0f}, "
                 f"W_L {f_wl * n / t_wl / 1e9:.1f} of {peak / 1e9:.0f} GFLOP/s) |")
    lines += ["", f"Batch {B}, 2 threads, `search` on the same batches interleaved: in one part "
              f"{qps_split[1]:,.0f} queries/s, split into two parts searched side by side after the W_C product (the "
              f"default with 2 threads) {qps_split[2]:,.0f} queries/s: {qps_split[2] / qps_split[1]:.2f}x."]
    lines += ["", f"Batch-1 operating points, 1 thread: each (beam, shortlist)'s latency and its R@{args.k} against "
              f"the exhaustive ELIAS top-{args.k} (every cluster and label scored; {args.recall_queries} queries). "
              "The points are timed interleaved query by query, so each runs after the others have filled the caches "
              "with their data: slower than a point timed alone (the first table), but comparable with each other.",
              "", f"| beam | shortlist | p50 (ms) | p99 (ms) | R@{args.k} vs exhaustive |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['beam']} | {p['shortlist']:,} | {p['p50']:.3f} | {p['p99']:.3f} | {p['recall']:.4f} |"
              for p in points]
    if ab:
        (n16, (a50, a99)), (n32, (b50, b99)) = ab.items()
        lines += ["", f"W_C storage, batch 1, 1 thread, beam {args.beam}, shortlist {args.shortlist}, the two "
                  "interleaved query by query (same queries, same index otherwise):", "",
                  "| W_C | p50 (ms) | p99 (ms) |", "| --- | ---: | ---: |",
                  f"| {n16} (index format 2) | {a50:.3f} | {a99:.3f} |",
                  f"| {n32} (index format 1) | {b50:.3f} | {b99:.3f} |",
                  "", f"fp32 / fp16 p50 ratio: {b50 / a50:.2f}x."]
    lines += ["", "Label storage order, batch 1, 1 thread, the two interleaved query by query (same queries; the same "
              "tensors, rows permuted): labels stored in cluster order (`label_layout.py`, what `write_index` writes "
              "since index format 3) and in label-id order (format 2).", "",
              "| beam | shortlist | cluster order p50 (ms) | p99 (ms) | label-id order p50 (ms) | p99 (ms) | "
              "id / cluster p50 |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b, K in order_points:
        (c50, c99), (i50, i99) = order["cluster order", b, K], order["label-id order", b, K]
        lines.append(f"| {b} | {K:,} | {c50:.3f} | {c99:.3f} | {i50:.3f} | {i99:.3f} | {i50 / c50:.2f}x |")
    wc_bytes = t.W_C.numel() * t.W_C.element_size()
    wl_bytes = args.shortlist * t.dim * t.W_L.element_size()
    p50_1t = rows[0][1] / 1e3
    bw_frac = (wc_bytes + wl_bytes) / p50_1t / ceiling["bandwidth_1t"]
    lines += [
        "", "Queries: `synthetic_queries` (each near one label, as a real query is near its labels). "
        "Batch 1, 1 thread, median time of each step (ms): "
        + ", ".join(f"{n} {v:.3f}" for n, v in stages.items()) + f" (sum {sum(stages.values()):.3f}).",
        "", f"{ceiling_line(ceiling)} Batch 1 reads {(wc_bytes + wl_bytes) / 2**20:.1f} MiB of W_C and shortlisted "
        f"W_L rows per query: at the 1-thread p50 that is {bw_frac:.0%} "
        f"of the 1-thread copy bandwidth; the W_C product alone takes {stages[STAGES[0]]:.3f} ms, "
        f"{wc_bytes / (stages[STAGES[0]] / 1e3) / ceiling['bandwidth_1t']:.0%} of it. Batch {B}: the W_C and W_L "
        f"products reach {(f_wc + f_wl) * n / (t_wc + t_wl) / ceiling['gemm_flops']:.0%} of the GEMM ceiling; the "
        f"whole search {qps * (f_wc + f_wl) / B / ceiling['gemm_flops']:.1%}.",
    ]
    write_section(SECTION, "\n".join(lines), args.benchmarks_file)
    print(f"wrote {SECTION!r} in {args.benchmarks_file}")


if __name__ == "__main__":
    main()
