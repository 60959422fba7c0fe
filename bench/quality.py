"""ELIAS vs PECOS XR-Linear on one dataset, side by side in one run, on the same tf-idf features.

    python bench/quality.py ../shared/data/tibkat           # writes "## Quality on TIBKAT"
    python bench/quality.py ../shared/data/eurlex57k --out runs/bench-eurlex57k
    python bench/quality.py ../shared/data/xc/bibtex --set train.stage1_epochs=8
    python bench/quality.py ../shared/data/eurlex57k --quick --no-write   # a small smoke run (the test suite)

ELIAS is trained with `elias train` at its defaults (plus any --set), model selection on dev, and evaluated on
test with and without the ELIAS++ re-ranker. XR-Linear runs on the same tf-idf features (the same featurizer
config, fitted anew and timed) in its own virtual environment, on as many threads as ELIAS trains with (torch's
default, the machine's cores, unless `--set train.threads=N` or `--xr-threads`). Training times include reading and
featurisation for both. The section also gives recall@100 by training frequency of the label.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import BENCHMARKS, ROOT, command_line, machine, publish, today  # noqa: E402

from elias_retrieval.config import EliasConfig  # noqa: E402
from elias_retrieval.data import dataset_data_config, read_split  # noqa: E402
from elias_retrieval.features import TfidfFeaturizer  # noqa: E402
from elias_retrieval.metrics import evaluate  # noqa: E402

COLUMNS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "R@10", "R@100")
BUCKETS = ("0", "1-2", "3-5", "6-20", "21-100", ">100")
NAMES = {"eurlex57k": "EURLEX57K", "tibkat": "TIBKAT", "bibtex": "Bibtex", "delicious": "Delicious"}
XR = "XR-Linear (beam 10)"


def section_title(data: Path) -> str:
    return f"## Quality on {NAMES.get(data.name, data.name)}"


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run a command; its wall time (s) and the peak RSS of the largest child so far (MB)."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def elias_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "elias_retrieval", *args]


def quick_overrides() -> list[str]:
    return ["train.max_train_points=2000", "train.max_eval_points=300", "train.stage1_epochs=1",
            "train.stage2_epochs=1", "train.stage1_min_examples=0", "train.stage2_min_examples=0",
            "features.max_features=5000", "features.ngram_max=1", "model.dim=64", "model.kappa=200",
            "model.shortlist_size=200",
            # one torch thread: on a shared 2-core box the default thread count makes this run 5x slower
            "train.threads=1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, nargs="?", default=ROOT.parent / "shared" / "data" / "eurlex57k",
                    help="dataset directory (default: EURLEX57K)")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default runs/bench-DATASET)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="elias train --set section.key=value")
    ap.add_argument("--quick", action="store_true", help="tiny run: 2,000 training points, 1 epoch per stage")
    ap.add_argument("--skip-xrlinear", action="store_true")
    ap.add_argument("--xr-threads", type=int, default=0,
                    help="XR-Linear's threads (default 0: as many as ELIAS trains with)")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    args = ap.parse_args()
    data: Path = args.data
    out: Path = args.out or ROOT / "runs" / f"bench-{data.name}"
    overrides = list(args.overrides) + (quick_overrides() if args.quick else [])
    elias_threads = EliasConfig().with_overrides(overrides).train.threads or torch.get_num_threads()
    xr_threads = args.xr_threads or elias_threads
    max_test = 500 if args.quick else 0
    env_line = machine()
    model_dir = out / "model"
    results: dict[str, dict] = {}

    # ---- ELIAS ----
    if (model_dir / "train_state").exists():
        import shutil

        shutil.rmtree(model_dir)
    sets = [x for o in overrides for x in ("--set", o)]
    train_s, elias_rss = run_measured(elias_cmd("train", str(data), str(model_dir), "--quiet", *sets))
    meta = json.loads((model_dir / "model.json").read_text())
    for name, extra in (("ELIAS++", []), ("ELIAS", ["--no-rerank"])):
        out_json = out / f"test-{name}.json"
        cmd = elias_cmd("eval", str(model_dir), str(data), "--split", "test", "--json", str(out_json), *extra)
        if max_test:
            cmd += ["--max-points", str(max_test)]
        run_measured(cmd)
        m = json.loads(out_json.read_text())
        results[name] = {**m, "train_s": train_s, "peak_mb": elias_rss,
                         "ms_per_query": 1000 * m["seconds"] / max(1, m["num_points"])}
    if "reranker" not in meta:
        results.pop("ELIAS++")

    # ---- XR-Linear on the same tf-idf features ----
    if not args.skip_xrlinear:
        from xrlinear import run_xrlinear

        cfg = EliasConfig().with_overrides(overrides)
        t0 = time.perf_counter()
        cfg.data = dataset_data_config(data, cfg.data)
        train = read_split(data, "train", cfg.data)
        if cfg.train.max_train_points:
            train = train.subset(np.arange(min(len(train), cfg.train.max_train_points)))
        test = read_split(data, "test", cfg.data, vocab=train.vocab)
        if max_test:
            test = test.subset(np.arange(min(len(test), max_test)))
        fz = TfidfFeaturizer.fit(train, cfg.features)
        X_train, X_test = fz.transform(train), fz.transform(test)
        feat_s = time.perf_counter() - t0
        xr = run_xrlinear(X_train, train.known_labels(), X_test, beam=10, topk=100, threads=xr_threads)
        counts = np.asarray(train.known_labels().sum(0)).ravel()
        m = evaluate(xr.test_ids, test.labels, counts, len(train))
        results[XR] = {**m, "train_s": feat_s + xr.train_s, "peak_mb": xr.peak_rss_mb,
                       "ms_per_query": xr.predict_ms_per_query}

    sel = meta["selected"]
    lines = [
        f"Machine: {env_line}. Date: {today()}. Command: `{command_line()}`.",
        "",
        f"Encoder: `{meta['encoder']}` (d = {meta['dim']}); N = {meta['num_train']:,} training points, "
        f"L = {meta['num_labels']:,}, C = {meta['num_clusters']}, kappa = {meta['kappa']}; selected stage "
        f"{sel['stage']} epoch {sel['epoch']} on dev. Train time includes reading and featurisation for every row; "
        "peak memory is the training process's maximum RSS. Prediction time is per query, batched, encoding "
        f"included for ELIAS (in-process beam search for XR-Linear). ELIAS trained on {elias_threads} thread(s), "
        f"XR-Linear on {xr_threads}.",
        "",
        "| method | " + " | ".join(COLUMNS) + " | train time (s) | peak memory (MB) | predict (ms/query) |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
                     + f" | {r['train_s']:.0f} | {r['peak_mb']:,.0f} | {r['ms_per_query']:.2f} |")
    xr_row = results.get(XR)
    if xr_row:
        lines += ["", "Against XR-Linear: " + "; ".join(
            f"{n}: P@5 {r['P@5'] - xr_row['P@5']:+.2f} points, R@100 {r['R@100'] - xr_row['R@100']:+.2f} points, "
            f"train time {r['train_s'] / xr_row['train_s']:.2f}x" for n, r in results.items() if n != XR) + "."]
    lines += ["", "Recall@100 by the label's number of training positives (micro-averaged over test (point, label) "
              "pairs; 0: labels never seen in training; -: no test label in the bucket):", "",
              "| method | " + " | ".join(BUCKETS) + " |", "| --- | " + " | ".join("---:" for _ in BUCKETS) + " |"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[f'R@100 [{b}]']:.2f}" if f"R@100 [{b}]" in r else "-"
                                                 for b in BUCKETS) + " |")
    t = meta.get("timings", {})
    parts = [f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in t.items() if k != "total_s"]
    lines += ["", f"Where ELIAS's training time goes: {', '.join(parts)} (total {t.get('total_s', 0):.0f} s)."]
    rr = meta.get("reranker", {})
    if rr.get("seconds"):
        chosen = (f", chosen on dev: {100 * rr['dev_positives_below_100_of_top_300']:.1f}% of the dev positives in "
                  "ELIAS's top 300 rank below 100" if "dev_positives_below_100_of_top_300" in rr else "")
        sec = rr["seconds"]
        lines += ["", f"The ELIAS++ ranker: depth {rr['depth']}{chosen}; the training points' top-{rr['depth']} lists "
                  f"{sec['shortlists']:.0f} s, the fit {sec['fit']:.0f} s, choosing the pruning and fusion weight on "
                  f"dev and saving {sec['choice_and_save']:.0f} s; {rr['nnz']:,} weights."]
    if meta.get("stage2_skipped"):
        lines += ["", f"Stage 2: {meta['stage2_skipped']}"]
    text = "\n".join(lines)
    title = section_title(data)
    publish(title, text, args)


if __name__ == "__main__":
    main()
