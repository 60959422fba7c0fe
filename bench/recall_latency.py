"""Quality vs latency on EURLEX57K: ELIAS's beam search against faiss HNSW / IVF / flat over the same W_L, and
XR-Linear (BENCHMARKS.md, "Quality vs latency on EURLEX57K"; plot docs/recall_latency_eurlex57k.png).

    .venv/bin/python bench/recall_latency.py                      # needs bench/quality.py's EURLEX57K model
    .venv/bin/python bench/recall_latency.py --queries 200 --max-points 500 --skip-xrlinear --no-write
    .venv/bin/python bench/recall_latency.py --quick --benchmarks-file /tmp/B.md --plot /tmp/p.png   # synthetic

The test split is encoded once; every method then gets the same query embeddings phi(x) (encoding is not timed).
Per point: R@100 and P@5 over the test split (metrics.evaluate on the top 100), single-query p50/p99 latency on a
sample (batch 1, torch and faiss OpenMP at 1 thread), and queries/s at batch 256 (all cores). ELIAS runs
`search.search` on the model's tensors in the layout an index and `Searcher` serve them from on the CPU (labels
in cluster order, fp32 W_L), without query validation or label-name lookup (the faiss indexes do neither). The
faiss baselines rank by the logit w_l . phi + b_l (elias_retrieval.baseline). XR-Linear trains once on the model's
tf-idf features in its own venv (bench/xrlinear.py) and predicts at each beam size; its latency is its worker's
batch predict time per query, one thread.
--quick builds a tiny synthetic index (elias_retrieval.synthetic), trains nothing and skips XR-Linear.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import BENCHMARKS, ROOT, command_line, machine, parse_args, today, write_section  # noqa: E402

from elias_retrieval.atomic import atomic_path  # noqa: E402
from elias_retrieval.baseline import AnnBaseline  # noqa: E402
from elias_retrieval.label_layout import in_cluster_order  # noqa: E402
from elias_retrieval.metrics import evaluate  # noqa: E402
from elias_retrieval.search import SearchTensors, search  # noqa: E402
from elias_retrieval.searcher import Searcher  # noqa: E402

SECTION = "## Quality vs latency on EURLEX57K"
PLOT = ROOT / "docs" / "recall_latency_eurlex57k.png"
GOAL_POINTS = 4.0  # acceptance goal: ELIAS's R@100 this many points above HNSW's at equal p50 latency
K = 100
# --quick: a synthetic index, a few seconds, for the test suite; the numbers mean nothing.
QUICK = {"labels": 2000, "dim": 32, "clusters": 32, "kappa": 200, "queries": 50, "max_points": 200, "batch": 64,
         "elias": "1x100,2x200,5x400", "ef": "16,64,256", "nprobe": "1,4,16", "warmup": 5}


@dataclass
class Point:
    """One operating point of one method."""

    method: str
    setting: str
    r100: float
    p5: float
    p50: float  # ms; XR-Linear: its batch predict time per query
    p99: float | None  # ms
    qps: float


@dataclass
class Bench:
    """The queries every method answers, their labels, and the measurement settings."""

    emb: torch.Tensor  # (N, d) float32
    emb_np: np.ndarray
    labels: sp.csr_matrix
    counts: np.ndarray
    num_train: int
    sample: np.ndarray  # rows timed one at a time
    batch: int
    threads: int
    warmup: int


def set_threads(n: int) -> None:
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def measure(b: Bench, method: str, setting: str, fn: Callable[[int, int], np.ndarray]) -> Point:
    """Top-100 of rows [lo, hi) by `fn`: quality and queries/s from batches, latency from single queries."""
    n = b.emb.shape[0]
    set_threads(b.threads)
    fn(0, min(b.batch, n))
    ids = np.empty((n, K), dtype=np.int64)
    t0 = time.perf_counter()
    for lo in range(0, n, b.batch):
        hi = min(lo + b.batch, n)
        ids[lo:hi] = fn(lo, hi)
    qps = n / (time.perf_counter() - t0)
    set_threads(1)
    for i in b.sample[: b.warmup]:
        fn(i, i + 1)
    ts = []
    for i in b.sample:
        t1 = time.perf_counter()
        fn(i, i + 1)
        ts.append(time.perf_counter() - t1)
    set_threads(b.threads)
    lat = np.asarray(ts) * 1e3
    m = evaluate(ids, b.labels, b.counts, b.num_train)
    p = Point(method, setting, m["R@100"], m["P@5"], float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
              qps)
    print(f"{method:>14} {setting:<24} R@100 {p.r100:6.2f}  P@5 {p.p5:6.2f}  p50 {p.p50:7.3f} ms  "
          f"p99 {p.p99:7.3f} ms  {qps:9,.0f} q/s", flush=True)
    return p


def ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def elias_grid(spec: str, num_clusters: int) -> list[tuple[int, int]]:
    """"BxS,..." -> [(beam, shortlist)], dropping beams larger than the number of clusters."""
    out = []
    for part in spec.split(","):
        beam, shortlist = (int(x) for x in part.lower().split("x"))
        if beam <= num_clusters:
            out.append((beam, shortlist))
    return out


def sweep(b: Bench, t: SearchTensors, args: argparse.Namespace) -> tuple[list[Point], dict[str, float]]:
    """ELIAS over (beam, shortlist), flat, HNSW over efSearch, IVF over nprobe; and the faiss build times."""
    points: list[Point] = []
    for beam, sl in elias_grid(args.elias, t.num_clusters):
        points.append(measure(b, "ELIAS", f"beam {beam}, shortlist {sl}",
                              lambda lo, hi, beam=beam, sl=sl: search(b.emb[lo:hi], t, K, beam, sl).ids.numpy()))
    build: dict[str, float] = {}
    q = b.emb_np
    flat = AnnBaseline.from_searcher(t, "flat")
    points.append(measure(b, flat.method, "exact", lambda lo, hi: flat.search(q[lo:hi], K)[0]))
    build["flat"] = flat.build_seconds
    set_threads(b.threads)
    hnsw = AnnBaseline.from_searcher(t, "hnsw", M=args.hnsw_m, ef_construction=args.ef_construction)
    build["hnsw"] = hnsw.build_seconds
    for ef in ints(args.ef):
        points.append(measure(b, hnsw.method, f"efSearch {ef}",
                              lambda lo, hi, ef=ef: hnsw.search(q[lo:hi], K, ef_search=ef)[0]))
    set_threads(b.threads)
    ivf = AnnBaseline.from_searcher(t, "ivf")
    build["ivf"] = ivf.build_seconds
    assert ivf.nlist is not None
    nprobes = ints(args.nprobe) if args.nprobe else [2**i for i in range(ivf.nlist.bit_length()) if 2**i < ivf.nlist]
    for npb in sorted({min(x, ivf.nlist) for x in [*nprobes, ivf.nlist]}):
        points.append(measure(b, ivf.method, f"nprobe {npb} of {ivf.nlist}",
                              lambda lo, hi, npb=npb: ivf.search(q[lo:hi], K, nprobe=npb)[0]))
    return points, build


def xrlinear_points(args: argparse.Namespace, tm, test, b: Bench) -> tuple[list[Point], str]:
    """XR-Linear, trained once on the model's tf-idf features, at each beam size; ([], why) when it cannot run."""
    from xrlinear import PecosInstallError, run_xrlinear_beams

    from elias_retrieval.data import read_split

    try:
        train = read_split(args.data, "train", tm.config.data, vocab=tm.vocab, max_rows=args.xrlinear_train_points)
        X_train, X_test = tm.featurizer.transform(train), tm.featurizer.transform(test)
        results = run_xrlinear_beams(X_train, train.known_labels(), X_test, beams=ints(args.xrlinear_beams), topk=K,
                                     threads=1)
        print(f"{'XR-Linear':>14} trained once in {results[0].train_s:.0f} s", flush=True)
        out = []
        for r in results:
            beam = r.params["beam"]
            m = evaluate(r.test_ids.astype(np.int64), b.labels, b.counts, b.num_train)
            ms = r.predict_ms_per_query
            out.append(Point("XR-Linear", f"beam {beam}", m["R@100"], m["P@5"], ms, None, 1e3 / ms))
            print(f"{'XR-Linear':>14} beam {beam:<19} R@100 {m['R@100']:6.2f}  P@5 {m['P@5']:6.2f}  "
                  f"{ms:.3f} ms/query (batch, 1 thread)", flush=True)
        return out, ""
    except (PecosInstallError, RuntimeError, OSError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"XR-Linear not run: {why}", file=sys.stderr, flush=True)
        return [], why


def frontier(points: list[Point]) -> list[Point]:
    """The points no faster point beats on R@100, by increasing p50."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.p50, -p.r100)):
        if not out or p.r100 > out[-1].r100:
            out.append(p)
    return out


def equal_latency(points: list[Point]) -> tuple[list[tuple[Point, float, bool]], list[Point]]:
    """HNSW's R@100 interpolated (in log latency) at each ELIAS frontier point's p50.

    Returns [(ELIAS point, HNSW R@100 there, clamped)] for the ELIAS points no faster than HNSW's fastest point
    (clamped: slower than HNSW's slowest, where HNSW's best is used), and the ELIAS points left out as too fast.
    """
    hnsw = frontier([p for p in points if p.method.startswith("HNSW")])
    elias = frontier([p for p in points if p.method == "ELIAS"])
    if not hnsw:
        return [], elias
    xs, ys = np.log([p.p50 for p in hnsw]), np.array([p.r100 for p in hnsw])
    pairs, faster = [], []
    for e in elias:
        if e.p50 < hnsw[0].p50:
            faster.append(e)
        else:
            pairs.append((e, float(np.interp(np.log(e.p50), xs, ys)), e.p50 > hnsw[-1].p50))
    return pairs, faster


def comparison_text(points: list[Point]) -> str:
    """The equal-latency comparison and whether the +4-point goal is met, in words."""
    pairs, faster = equal_latency(points)
    lines = [f"ELIAS vs HNSW at equal p50 latency (HNSW's R@100 interpolated in log latency along its efSearch "
             f"curve at each latency where ELIAS is on its own quality-latency frontier; goal: ELIAS "
             f"+{GOAL_POINTS:.0f} R@100 points):", ""]
    if not pairs:
        lines.append("no ELIAS frontier point is as slow as HNSW's fastest point: no equal-latency comparison.")
        return "\n".join(lines)
    for e, h, clamped in pairs:
        lines.append(f"- {e.setting} at {e.p50:.3f} ms: ELIAS {e.r100:.2f}, HNSW {h:.2f}"
                     + (" (HNSW's best, reached at a lower latency)" if clamped else "")
                     + f": {e.r100 - h:+.2f} points")
    diffs = np.array([e.r100 - h for e, h, _ in pairs])
    met = int((diffs >= GOAL_POINTS).sum())
    best = int(np.argmax(diffs))
    lines += ["", f"Measured: ELIAS leads by {diffs.min():+.2f} to {diffs.max():+.2f} R@100 points (largest at "
              f"{pairs[best][0].setting}); the +{GOAL_POINTS:.0f}-point goal is "
              + (f"**met** at {met} of {len(pairs)} compared latencies." if met else
                 f"**not met** at any of the {len(pairs)} compared latencies.")]
    if faster:
        lines.append(f"Not compared: {len(faster)} ELIAS point(s) faster than HNSW's fastest ("
                     + ", ".join(f"{e.setting}, {e.p50:.3f} ms, R@100 {e.r100:.2f}" for e in faster) + ").")
    return "\n".join(lines)


def table(points: list[Point], skipped: str, batch: int) -> list[str]:
    lines = [f"| method | setting | R@100 | P@5 | p50 (ms) | p99 (ms) | queries/s (batch {batch}) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        xr = p.method == "XR-Linear"
        lines.append(f"| {p.method} | {p.setting} | {p.r100:.2f} | {p.p5:.2f} | {p.p50:.3f}{' †' if xr else ''} | "
                     f"{'' if p.p99 is None else f'{p.p99:.3f}'} | {p.qps:,.0f}{' †' if xr else ''} |")
    if skipped:
        lines.append(f"| XR-Linear | not run: {skipped.replace('|', '/')} | | | | | |")
    return lines


def plot(points: list[Point], path: Path, title: str) -> None:
    """R@100 against p50 latency (log x), one curve per method; written atomically."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(p.method for p in points):
        ps = sorted((p for p in points if p.method == method), key=lambda p: p.p50)
        if method == "ELIAS":
            ax.scatter([p.p50 for p in ps], [p.r100 for p in ps], s=14, alpha=0.4, color="C0")
            ps = frontier(ps)
        style = "*" if len(ps) == 1 else "o-"
        ax.plot([p.p50 for p in ps], [p.r100 for p in ps], style, ms=9 if len(ps) == 1 else 4,
                label=method + (" (frontier)" if method == "ELIAS" else ""))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("p50 latency per query (ms, batch 1, 1 thread; XR-Linear: batch time per query)")
    ax.set_ylabel("R@100 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "runs" / "bench-eurlex57k" / "model")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "eurlex57k")
    ap.add_argument("--max-points", type=int, default=0, help="test points scored (0 = all)")
    ap.add_argument("--queries", type=int, default=500, help="queries timed one at a time per point")
    ap.add_argument("--warmup", type=int, default=50, help="untimed single queries before each latency run")
    ap.add_argument("--batch", type=int, default=256, help="batch size for quality and queries/s")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/faiss threads for batches")
    ap.add_argument("--elias", default="1x100,1x300,2x300,2x1000,5x300,5x1000,10x1000,10x2000,20x2000,40x2000",
                    help="ELIAS points as beam x shortlist")
    ap.add_argument("--ef", default="16,32,64,128,256,512,1024", help="HNSW efSearch values")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--nprobe", default="", help="IVF nprobe values (default: powers of two up to nlist)")
    ap.add_argument("--xrlinear-beams", default="1,2,5,10,20")
    ap.add_argument("--xrlinear-train-points", type=int, default=0, help="XR-Linear trains on the first N (0 = all)")
    ap.add_argument("--skip-xrlinear", action="store_true")
    ap.add_argument("--labels", type=int, default=3000, help="--quick: synthetic labels")
    ap.add_argument("--dim", type=int, default=32, help="--quick: synthetic embedding dimension")
    ap.add_argument("--clusters", type=int, default=32, help="--quick: synthetic clusters")
    ap.add_argument("--kappa", type=int, default=200, help="--quick: synthetic slots per cluster")
    ap.add_argument("--plot", type=Path, default=None, help=f"plot path (default {PLOT.relative_to(ROOT)}; "
                    "--quick: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help=f"synthetic index, a few seconds ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    ap.add_argument("--no-write", action="store_true", help="print only; write neither BENCHMARKS.md nor the plot")
    args = parse_args(ap, QUICK)
    machine_desc = machine()  # before the run: the load average says whether the machine was quiet
    rng = np.random.default_rng(0)
    skipped = ""
    tm = test = None
    if args.quick:
        from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

        raw = synthetic_tensors(args.labels, dim=args.dim, kappa=args.kappa, num_clusters=args.clusters, dtype="fp32")
        emb, planted = synthetic_queries(raw, args.max_points, seed=1)
        n = len(planted)
        labels = sp.csr_matrix((np.ones(n, np.float32), planted.numpy(), np.arange(n + 1)), shape=(n, args.labels))
        counts, num_train = np.ones(args.labels), args.labels
        skipped = "--quick uses a synthetic index, which has no sparse features to train XR-Linear on"
        what = (f"Synthetic index (--quick; the numbers mean nothing): L = {args.labels:,}, C = {args.clusters}, "
                f"kappa = {raw.A_ids.shape[1]}, d = {args.dim}; each query's one label is the planted one")
    else:
        if not (args.model / "model.json").is_file():
            print(f"{args.model}: no trained model; run bench/quality.py first", file=sys.stderr)
            sys.exit(2)
        from elias_retrieval.data import read_split
        from elias_retrieval.modeldir import load_model_dir

        tm = load_model_dir(args.model)
        test = read_split(args.data, "test", tm.config.data, vocab=tm.vocab, max_rows=args.max_points)
        t0 = time.perf_counter()
        emb = tm.model.encoder.encode(test)
        print(f"encoded {len(test):,} test points in {time.perf_counter() - t0:.1f} s", flush=True)
        raw = tm.model.search_tensors()
        labels, counts, num_train = test.labels, tm.train_label_counts.numpy(), int(tm.meta["num_train"])
        if args.skip_xrlinear:
            skipped = "--skip-xrlinear"
        meta = tm.meta
        what = (f"Model: `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}` "
                f"(encoder `{meta['encoder']}`, d = {meta['dim']}; L = {meta['num_labels']:,}, "
                f"C = {meta['num_clusters']}, kappa = {meta['kappa']}), EURLEX57K test split")
    # The serving layout: labels in cluster order (as an index stores them), Searcher's CPU tensors.
    t = Searcher(in_cluster_order(raw), None, None, {"defaults": {"k": K}}, device="cpu").tensors
    emb = emb.float().contiguous()
    sample = rng.choice(len(emb), size=min(args.queries, len(emb)), replace=False)
    b = Bench(emb, emb.numpy(), labels, counts, num_train, sample, args.batch, args.threads, args.warmup)
    points, build = sweep(b, t, args)
    if tm is not None and not args.skip_xrlinear:
        xr, skipped = xrlinear_points(args, tm, test, b)
        points += xr

    body = [
        f"{what}, {len(emb):,} points; latency over {len(sample)} of them. Machine: {machine_desc}. "
        f"Date: {today()}. Command: `{command_line()}`.", "",
        "Query embeddings phi(x) are computed once and given to every method (encoding not timed); top 100 per "
        "query. p50/p99: one query at a time, torch and faiss OpenMP at 1 thread. queries/s: batches of "
        f"{args.batch}, {args.threads} thread(s). ELIAS: `search.search` on the model's tensors in `Searcher`'s CPU "
        "layout (labels in cluster order, fp32 W_L). faiss (elias_retrieval.baseline): the same W_L and b_L, bias "
        "folded in, W_L centred on its mean row (rank-preserving), ranked by w_l . phi + b_l; HNSW M = "
        f"{args.hnsw_m}, efConstruction = {args.ef_construction}; build {build['hnsw']:.2f} s (HNSW), "
        f"{build['ivf']:.2f} s (IVF). † XR-Linear (PECOS, the model's tf-idf features, trained once on "
        f"{f'the first {args.xrlinear_train_points:,}' if args.xrlinear_train_points else 'all'} training "
        "points, then predicting at each beam size): its worker's predict time over the whole split per query, "
        "batched, 1 thread; queries/s = 1000 / that.", "",
        *table(points, skipped, args.batch), "",
        comparison_text(points),
    ]
    text = "\n".join(body)
    if args.no_write:
        print(text)
        return
    plot_path = args.plot or (Path(tempfile.mkdtemp(prefix="recall-latency-")) / "recall_latency.png" if args.quick
                              else PLOT)
    plot(points, plot_path, "EURLEX57K: R@100 vs single-query latency" if not args.quick else "synthetic (--quick)")
    shown = plot_path.resolve().relative_to(ROOT) if plot_path.resolve().is_relative_to(ROOT) else plot_path
    write_section(SECTION, text + f"\n\n![R@100 against p50 latency]({shown})", args.benchmarks_file)
    print(f"wrote {SECTION!r} in {args.benchmarks_file} and the plot {plot_path}")


if __name__ == "__main__":
    main()
