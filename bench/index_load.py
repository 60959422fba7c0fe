"""Index size, load time and resident memory on a synthetic index; fp16/int8 quality on a trained model.

    .venv/bin/python bench/index_load.py                          # 1M labels, d=256, kappa=1000, C=16384
    .venv/bin/python bench/index_load.py --labels 100000 --no-write
    .venv/bin/python bench/index_load.py --quality runs/bench-eurlex57k/model ../shared/data/eurlex57k
    .venv/bin/python bench/index_load.py --quick --benchmarks-file /tmp/B.md   # tiny smoke run (the tests)

Default mode (BENCHMARKS.md, "## Index size and load time"): builds fp16 and int8 indexes of
`elias_retrieval.synthetic` tensors, reports the size of each part against the acceptance ratios, then
in a fresh process per measurement: `read_index` time, the first search's time (k=100, beam 20,
K=2000, batch 1) and the resident memory after each, with the page cache of the index's files dropped
(cold) and kept (warm). Top-10 overlap of fp16/int8 with an fp32 search of the same tensors.

`--quality MODEL_DIR DATASET_DIR` (BENCHMARKS.md, "## Index dtype quality"): builds fp32/fp16/int8
indexes of a trained model and evaluates each on the test split (P@k, R@100, top-10 overlap with fp32).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import BENCHMARKS, command_line, machine, parse_args, today, write_section  # noqa: E402

from elias_retrieval.index_format import drop_page_cache, index_size, read_index, write_index  # noqa: E402
from elias_retrieval.search import SearchTensors, search  # noqa: E402

SIZE_SECTION = "## Index size and load time"
QUALITY_SECTION = "## Index dtype quality"
MiB = 1 << 20
# --quick: a few seconds, for the test suite; the numbers mean nothing. max_points applies to --quality.
QUICK = {"labels": 10_000, "dim": 32, "kappa": 100, "shortlist": 500, "queries": 50, "repeats": 1, "max_points": 200}

# Runs in a fresh interpreter: imports first (not timed), then open, first search, RSS.
_PROBE = r"""
import json, sys, time
import numpy as np, psutil, torch
from elias_retrieval.index_format import read_index
from elias_retrieval.search import search
index_dir, query_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
q = json.loads(open(query_file).read())
emb, target = torch.tensor([q["embedding"]], dtype=torch.float32), q["label"]
search(torch.zeros(1, 4), __import__("elias_retrieval.synthetic", fromlist=["x"]).synthetic_tensors(
    500, dim=4, kappa=50), k=5)  # warm torch's own code paths on a toy index, not on this one
proc = psutil.Process()
rss0 = proc.memory_info().rss
t0 = time.perf_counter()
ix = read_index(index_dir)
t_open = time.perf_counter() - t0
rss_open = proc.memory_info().rss - rss0
d = ix.defaults
t0 = time.perf_counter()
res = search(emb, ix.tensors, k=d["k"], beam_size=d["beam_size"], shortlist_size=d["shortlist_size"])
t_first = time.perf_counter() - t0
rss_first = proc.memory_info().rss - rss0
t0 = time.perf_counter()
search(emb, ix.tensors, k=d["k"], beam_size=d["beam_size"], shortlist_size=d["shortlist_size"])
t_second = time.perf_counter() - t0
t0 = time.perf_counter()
n_labels = len(ix.labels)
t_labels = time.perf_counter() - t0
print(json.dumps({"open_s": t_open, "first_search_s": t_first, "second_search_s": t_second,
                  "labels_s": t_labels, "rss_open": rss_open, "rss_first": rss_first,
                  "top1_ok": int(res.ids[0, 0]) == target, "num_labels": n_labels}))
"""


def overlap_at_10(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a[:, :10].tolist(), b[:, :10].tolist()
    return sum(len(set(x) & set(y) - {-1}) for x, y in zip(a, b, strict=True)) / max(1, sum(
        len(set(x) - {-1}) for x in a))


def batched_search(emb: torch.Tensor, t: SearchTensors, k: int, beam: int, K: int, batch: int = 256) -> torch.Tensor:
    return torch.cat([search(emb[i : i + batch], t, k=k, beam_size=beam, shortlist_size=K).ids
                      for i in range(0, len(emb), batch)])


def probe(index_dir: Path, query_file: Path, threads: int, cold: bool) -> dict:
    if cold:
        drop_page_cache(index_dir)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(index_dir), str(query_file), str(threads)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def size_and_load(args: argparse.Namespace) -> None:
    from elias_retrieval.data import LabelVocab
    from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

    desc = machine()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="elias-index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    t = synthetic_tensors(args.labels, dim=args.dim, kappa=args.kappa, num_clusters=args.clusters, dtype="fp32")
    t_gen = time.perf_counter() - t0
    print(f"synthetic L={t.num_labels:,} C={t.num_clusters:,} kappa={t.A_ids.shape[1]} d={t.dim} "
          f"in {t_gen:.1f} s", flush=True)
    labels = LabelVocab([str(i) for i in range(t.num_labels)], [])
    defaults = {"k": 100, "beam_size": args.beam, "shortlist_size": args.shortlist}
    sizes, build_s = {}, {}
    for dtype in ("fp16", "int8"):
        t0 = time.perf_counter()
        write_index(work / dtype, t, labels, None, dtype=dtype, defaults=defaults, meta={"synthetic": True})
        build_s[dtype] = time.perf_counter() - t0
        sizes[dtype] = index_size(work / dtype)
        print(f"{dtype}: built in {build_s[dtype]:.1f} s, {sum(sizes[dtype].values()) / MiB:,.1f} MiB", flush=True)

    q, target = synthetic_queries(t, args.queries, seed=1)
    ref = batched_search(q, t, 10, args.beam, args.shortlist)
    overlaps, top1 = {}, {}
    for dtype in ("fp16", "int8"):
        ix = read_index(work / dtype)
        got = batched_search(q, ix.tensors, 10, args.beam, args.shortlist)
        overlaps[dtype] = overlap_at_10(ref, got)
        top1[dtype] = float((got[:, 0] == target).float().mean())
        del ix
    top1["fp32"] = float((ref[:, 0] == target).float().mean())
    del t, ref
    print(f"top-10 overlap with fp32: {overlaps}; top-1 = planted label: {top1}", flush=True)

    query_file = work / "query.json"
    query_file.write_text(json.dumps({"embedding": q[0].tolist(), "label": int(target[0])}))
    runs: dict[tuple[str, str], dict] = {}
    for dtype in ("fp16", "int8"):
        for mode in ("cold", "warm"):
            reps = [probe(work / dtype, query_file, args.threads, cold=mode == "cold") for _ in range(args.repeats)]
            med = {k: float(np.median([r[k] for r in reps])) for k in reps[0] if k != "top1_ok"}
            med["top1_ok"] = all(r["top1_ok"] for r in reps)
            runs[dtype, mode] = med
            print(dtype, mode, json.dumps(med), flush=True)

    # ----- report
    def part(s: dict[str, int], *names: str) -> int:
        return sum(s.get(n, 0) for n in names)

    f16, i8 = sizes["fp16"], sizes["int8"]
    total16, total8 = sum(f16.values()), sum(i8.values())
    wl16, wl8 = part(f16, "W_L", "b_L"), part(i8, "W_L", "W_L_scale", "b_L")
    core = part(f16, "W_L", "b_L", "A_ids", "A_weights", "W_C", "b_C", "encoder")
    core_nobias = part(f16, "W_L", "A_ids", "A_weights", "W_C", "encoder")
    rest16 = total16 - wl16
    rest8 = total8 - wl8
    limit8 = 0.55 * wl16 + rest8
    lines = [
        f"Synthetic index (`elias_retrieval.synthetic`): L = {args.labels:,}, C = {f16['W_C'] // (2 * args.dim):,}, "
        f"kappa = {args.kappa}, d = {args.dim}, no encoder (embedding queries). Search defaults k = 100, "
        f"beam = {args.beam}, K = {args.shortlist}; torch threads = {args.threads}. Machine: {desc}. "
        f"Date: {today()}. Command: `{command_line()}`.",
        "",
        "Size on disk (bytes):",
        "",
        "| part | fp16 index | int8 index |",
        "| --- | ---: | ---: |",
    ]
    order = ["W_L", "W_L_scale", "b_L", "row_labels", "A_ids", "A_weights", "W_C", "b_C", "labels.jsonl",
             "manifest.json", "tensors header"]
    for name in order + sorted((set(f16) | set(i8)) - set(order)):  # every part, so the rows sum to the total
        lines.append(f"| {name} | {f16.get(name, 0):,} | {i8.get(name, 0):,} |")
    lines += [
        f"| **total** | **{total16:,}** | **{total8:,}** |",
        "",
        "| acceptance | measured | limit | pass |",
        "| --- | ---: | ---: | --- |",
        f"| fp16 index / (fp16 W_L + b_L + A + W_C + b_C + encoder) | {total16 / core:.4f}x | 1.05x | "
        f"{'yes' if total16 <= 1.05 * core else 'NO'} |",
        f"| same, biases counted as overhead: fp16 index / (W_L + A + W_C + encoder) | {total16 / core_nobias:.4f}x "
        f"| 1.05x | {'yes' if total16 <= 1.05 * core_nobias else 'NO'} |",
        f"| int8 index / (0.55 x fp16 index's W_L part + the int8 index's rest) | {total8 / limit8:.4f}x "
        f"(int8 W_L part = {wl8 / wl16:.3f} x fp16's) | 1x | {'yes' if total8 <= limit8 else 'NO'} |",
        "",
        f"fp16 W_L part = W_L + b_L; int8 W_L part = W_L + W_L_scale + b_L; rest = everything else "
        f"(fp16: {rest16:,} B, int8: {rest8:,} B). Build (write + fsync + sha256): fp16 {build_s['fp16']:.1f} s, "
        f"int8 {build_s['int8']:.1f} s.",
        "",
        "Load time and memory (median of "
        f"{args.repeats} fresh processes; cold = the index's pages dropped from the page cache first):",
        "",
        "| index | cache | `read_index` (s) | first search (s) | second search (ms) | RSS after open (MiB) "
        "| RSS after first search (MiB) | file size (MiB) | top-1 = planted label |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (dtype, mode), r in runs.items():
        size = total16 if dtype == "fp16" else total8
        lines.append(f"| {dtype} | {mode} | {r['open_s']:.4f} | {r['first_search_s']:.3f} | "
                     f"{1e3 * r['second_search_s']:.1f} | {r['rss_open'] / MiB:.1f} | {r['rss_first'] / MiB:.1f} | "
                     f"{size / MiB:,.0f} | {'yes' if r['top1_ok'] else 'no'} |")
    worst_open = max(r["open_s"] for r in runs.values())
    worst_first = max(r["first_search_s"] for r in runs.values())
    lines += [
        "",
        f"Acceptance: open <= 0.2 s: {'yes' if worst_open <= 0.2 else 'NO'} (worst {worst_open:.4f} s); "
        f"first search <= 1 s: {'yes' if worst_first <= 1 else 'NO'} (worst {worst_first:.3f} s). "
        f"RSS counts the pages the process touched; the mapped file is not read at open. "
        f"The label vocabulary is parsed lazily on first use ({runs['fp16', 'warm']['labels_s']:.2f} s warm "
        f"for {args.labels:,} labels), outside the open time.",
        "",
        f"Quality on {args.queries} synthetic queries (each drawn near a planted label): top-10 overlap with an "
        f"fp32 search of the same tensors: fp16 {overlaps['fp16']:.4f}, int8 {overlaps['int8']:.4f}; top-1 = "
        f"planted label: fp32 {top1['fp32']:.3f}, fp16 {top1['fp16']:.3f}, int8 {top1['int8']:.3f}.",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        write_section(SIZE_SECTION, report, args.benchmarks_file)
        print(f"wrote {SIZE_SECTION!r} in {args.benchmarks_file}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def quality(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """fp32 / fp16 / int8 indexes of a trained model, evaluated on one split (R@100 acceptance)."""
    from elias_retrieval.data import read_split
    from elias_retrieval.metrics import evaluate
    from index_builder.build import build_index

    model_dir, dataset_dir = Path(args.quality[0]), Path(args.quality[1])
    desc = machine()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="elias-index-quality-"))
    results: dict[str, dict[str, float]] = {}
    ids_by: dict[str, torch.Tensor] = {}
    emb = data = None
    for dtype in ("fp32", "fp16", "int8"):
        build_index(model_dir, work / dtype, dtype=dtype, kappa=args.prune_kappa, progress=False)
        ix = read_index(work / dtype, verify=True)
        if emb is None:  # the encoder is the same in all three
            data = read_split(dataset_dir, args.split, None if "config" not in ix.manifest else
                              _data_cfg(ix.manifest), vocab=ix.labels)
            if args.max_points and len(data) > args.max_points:
                data = data.subset(np.arange(args.max_points))
            emb = ix.load_encoder().encode(data)
        d = ix.defaults
        ids = batched_search(emb, ix.tensors, 100, d["beam_size"], d["shortlist_size"], batch=512)
        ids_by[dtype] = ids
        counts = ix.train_label_counts.numpy() if ix.train_label_counts is not None else np.zeros(len(ix.labels))
        m = evaluate(ids.numpy(), data.labels, counts, int(ix.manifest.get("num_train") or 1))
        m["size_mib"] = sum(index_size(work / dtype).values()) / MiB
        results[dtype] = m
        print(dtype, {k: round(v, 3) for k, v in m.items() if k in ("P@1", "P@5", "R@100", "size_mib")}, flush=True)
    for dtype in ("fp16", "int8"):
        results[dtype]["overlap@10"] = overlap_at_10(ids_by["fp32"], ids_by[dtype])
    base = results["fp32"]
    lines = [
        f"Model `{model_dir}`, {args.split} split of `{dataset_dir}` ({len(data):,} points), indexes built with "
        f"`elias build-index --dtype fp32|fp16|int8`{f' --kappa {args.prune_kappa}' if args.prune_kappa else ''}, "
        f"searched with the index defaults. Machine: {desc}. Date: {today()}. Command: `{command_line()}`.",
        "",
        "| W_L dtype | size (MiB) | P@1 | P@5 | R@100 | R@100 - fp32 | limit | pass | top-10 overlap with fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for dtype, limit in (("fp32", None), ("fp16", 0.1), ("int8", 0.3)):
        r = results[dtype]
        delta = r["R@100"] - base["R@100"]
        ok = "" if limit is None else ("yes" if abs(delta) <= limit else "NO")
        lines.append(f"| {dtype} | {r['size_mib']:,.1f} | {r['P@1']:.2f} | {r['P@5']:.2f} | {r['R@100']:.2f} | "
                     f"{delta:+.2f} | {'' if limit is None else f'{limit} point'} | {ok} | "
                     f"{r.get('overlap@10', 1.0):.4f} |")
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        write_section(QUALITY_SECTION, report, args.benchmarks_file)
        print(f"wrote {QUALITY_SECTION!r} in {args.benchmarks_file}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _data_cfg(manifest: dict):
    from elias_retrieval.config import EliasConfig

    return EliasConfig.from_dict(manifest["config"]).data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--kappa", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=None, help="default 2^ceil(log2(L/100))")
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--shortlist", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries for the fp16/int8 overlap")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per load measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the load probe")
    ap.add_argument("--quality", nargs=2, metavar=("MODEL_DIR", "DATASET_DIR"),
                    help="evaluate fp32/fp16/int8 indexes of a trained model instead")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-points", type=int, default=0)
    ap.add_argument("--prune-kappa", type=int, default=None, help="--quality: also prune A (build-index --kappa)")
    ap.add_argument("--work-dir", default=None, help="where the indexes are built (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes, a few seconds ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the tables go")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parse_args(ap, QUICK)
    if args.quality:
        quality(args)
    else:
        size_and_load(args)


if __name__ == "__main__":
    main()
