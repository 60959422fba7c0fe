"""The ELIAS++ ranker's fit and depth, on one trained model: scikit-learn's per-label fits against the batched
solver, and the re-rank depth, each fitted on the same shortlists, tuned on dev and scored on test in one run.

    python bench/ranker_fit.py runs/bench-tibkat/model ../shared/data/tibkat     # writes "## ELIAS++ ranker ..."
    python bench/ranker_fit.py MODEL_DIR DATASET_DIR --depths 100,200,300 --no-reference
    python bench/ranker_fit.py --quick --no-write    # a model trained in seconds on Bibtex (the suite runs it)

Each row fits the ranker on the model's top-`depth` lists of the training points (their hard negatives), chooses
its pruning threshold and fusion weight on dev as `elias train` does (trainer.train.Trainer._train_reranker), and
re-ranks the test split's top `depth`, whose first 100 are scored. The ELIAS row is the model without a ranker.
The `sklearn` row is `trainer.reranker.fit_labels_reference` (LinearSVC per label) at depth 100: the fit the
trainer used before the batched solver.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import BENCHMARKS, ROOT, command_line, machine, publish, today  # noqa: E402

from elias_retrieval.data import read_split  # noqa: E402
from elias_retrieval.encoders import SparseInputs  # noqa: E402
from elias_retrieval.evaluation import predict  # noqa: E402
from elias_retrieval.metrics import evaluate  # noqa: E402
from elias_retrieval.modeldir import load_model_dir  # noqa: E402
from elias_retrieval.reranker import SparseRanker  # noqa: E402
from trainer.reranker import (  # noqa: E402
    candidates,
    choose_pruning,
    deep_keep_rate,
    fit_labels_reference,
    train_ranker,
)
from trainer.train import load_data  # noqa: E402

SECTION = "## ELIAS++ ranker: fit and depth"
COLUMNS = ("P@1", "P@5", "nDCG@5", "PSP@5", "R@100", "R@100 [1-2]", "R@100 [3-5]")


def reference_ranker(X: sp.csr_matrix, Y: sp.csr_matrix, ids: np.ndarray, c: float, threshold: float,
                     seed: int) -> SparseRanker:
    """The ranker from scikit-learn's per-label fits (one process: the reference's cost per label)."""
    L = Y.shape[1]
    cols, vals, bias = fit_labels_reference(X, candidates(Y, ids), Y.tocsc(), np.arange(L), c, threshold, seed)
    indptr = np.zeros(L + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in cols])
    W = sp.csr_matrix((np.concatenate(vals), np.concatenate(cols), indptr), shape=(L, X.shape[1]))
    return SparseRanker(W, bias)


def quick_model(out: Path) -> tuple[Path, Path]:
    from elias_retrieval.config import EliasConfig
    from trainer.train import train

    data = ROOT.parent / "shared" / "data" / "xc" / "bibtex"
    cfg = EliasConfig().with_overrides(["train.stage1_epochs=1", "train.stage2_epochs=0", "train.stage1_min_examples=0",
                                        "train.reranker=false", "model.dim=32", "train.threads=1"])
    train(data, out, cfg, progress=False)
    return out, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", help="trained model directory")
    ap.add_argument("data", type=Path, nargs="?", help="its dataset directory (train, dev and test splits)")
    ap.add_argument("--depths", default="100,200,300", help="re-rank depths, comma-separated")
    ap.add_argument("--deep-keeps", default="1.0",
                    help="rates at which the deep negatives are kept (train.reranker_deep_keep; 0: the budget by "
                         "the depth), comma-separated; each is fitted at each depth above 100")
    ap.add_argument("--deep-from", type=int, default=0,
                    help="the rank from which negatives are sampled (train.reranker_deep_from; 0: the model's); "
                         "with it, the keep rates are fitted at depth 100 too")
    ap.add_argument("--tols", default="",
                    help="the fits' stopping tolerances (train.reranker_tol), comma-separated; each is fitted at each "
                         "depth and rate (default: the model's)")
    ap.add_argument("--no-reference", action="store_true", help="skip the scikit-learn fit")
    ap.add_argument("--threads", type=int, default=0, help="solver threads (0: torch's, every core)")
    ap.add_argument("--quick", action="store_true", help="a tiny model on Bibtex, depths 100 and 150")
    ap.add_argument("--no-write", action="store_true", help="print the table instead of writing BENCHMARKS.md")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS)
    ap.add_argument("--section", default=SECTION, help="the BENCHMARKS.md section to write")
    args = ap.parse_args()
    env_line = machine()
    depths = [int(d) for d in args.depths.split(",")]
    if min(depths) < 100:
        ap.error("--depths: each at least 100 (the answer is the re-ranked list's top 100)")
    keeps = [float(k) for k in args.deep_keeps.split(",")]
    if not all(0.0 <= k <= 1.0 for k in keeps):
        ap.error("--deep-keeps: each in [0, 1] (0: the budget by the depth)")
    if args.quick:
        scratch = tempfile.TemporaryDirectory(prefix="bench-ranker-")
        args.model, args.data = quick_model(Path(scratch.name) / "model")
        depths = [100, 150]
    if args.model is None or args.data is None:
        ap.error("give MODEL_DIR and DATASET_DIR (or --quick)")
    threads = args.threads or torch.get_num_threads()
    tm = load_model_dir(args.model, torch.device("cpu"))
    cfg, t = tm.config, tm.config.train
    beam, K = cfg.model.beam_size, cfg.model.shortlist_size
    _, data = load_data(args.data, cfg, tm.featurizer, progress=False)
    if data.dev is None:
        raise SystemExit(f"{args.data}: no dev split (nor a held-out one) to tune the ranker on")
    test = read_split(args.data, "test", cfg.data, vocab=data.train.vocab)
    enc, tensors = tm.model.encoder, tm.model.search_tensors()
    D = max(100, *depths)
    X_dev, X_test = tm.featurizer.transform(data.dev), tm.featurizer.transform(test)
    t0 = time.perf_counter()
    train_ids, _ = predict(enc, tensors, data.train, D, beam, K, t.eval_batch_size, inputs=SparseInputs(data.X_train))
    shortlist_s = time.perf_counter() - t0
    dev_ids, dev_scores = predict(enc, tensors, data.dev, D, beam, K, t.eval_batch_size, inputs=SparseInputs(X_dev))
    test_ids, test_scores = predict(enc, tensors, test, D, beam, K, t.eval_batch_size, inputs=SparseInputs(X_test))
    counts, n = data.label_counts, len(data.train)
    floor = min(t.reranker_thresholds)

    rows: list[tuple[str, dict, str]] = [("ELIAS (no ranker)", evaluate(test_ids[:, :100], test.labels, counts, n), "")]
    tols = [float(x) for x in args.tols.split(",")] if args.tols else [t.reranker_tol]
    fits: list[tuple[str, int, float, float, bool]] = (
        [] if args.no_reference else [("sklearn LinearSVC per label", 100, 1.0, 0.1, True)])
    deep_from = args.deep_from or t.reranker_deep_from
    for d in depths:
        for k in keeps if d > deep_from else [1.0]:
            rate = deep_keep_rate(k, d, deep_from)
            kept = "" if rate == 1.0 else f", negatives from rank {deep_from} kept at {rate:.2g}" + (
                " (the budget)" if k == 0 else "")
            for tol in tols:
                stop = f", tolerance {tol:g}" if len(tols) > 1 else ""
                fits.append((f"batched solver, depth {d}{kept}{stop}", d, k, tol, False))
    for name, depth, keep, tol, ref in fits:
        t0 = time.perf_counter()
        if ref:
            ranker = reference_ranker(data.X_train, data.Y_train, train_ids[:, :depth], t.reranker_c, floor, t.seed)
        else:
            ranker = train_ranker(data.X_train, data.Y_train, train_ids[:, :depth], t.reranker_c, floor,
                                  n_jobs=threads, seed=t.seed, deep_keep=keep, deep_from=deep_from, tol=tol)
        fit_s = time.perf_counter() - t0
        thr, w, by = choose_pruning(ranker, t.reranker_thresholds, X_dev, dev_ids[:, :depth], dev_scores[:, :depth],
                                    data.dev.labels, counts, n, t.select_metric)
        ranker = ranker.pruned(thr)
        order, _ = ranker.order(X_test, test_ids[:, :depth], test_scores[:, :depth], w)
        m = evaluate(np.take_along_axis(test_ids[:, :depth], order, 1)[:, :100], test.labels, counts, n)
        note = (f"{fit_s:.1f} s, {1 if ref else threads} thread{'s' if threads > 1 and not ref else ''}; pruned "
                f"at {thr:g} ({ranker.W.nnz:,} weights), fusion weight {w}, dev {t.select_metric} {by[thr][w]:.2f}")
        rows.append((name, m, note))
        print(f"{name}: {note}", flush=True)

    meta = tm.meta
    lines = [
        f"Machine: {env_line}. Date: {today()}. Command: `{command_line()}`.",
        "",
        f"Model `{args.model}` ({meta.get('encoder')}, L = {meta.get('num_labels'):,}, N = {n:,}); the training "
        f"points' top-{D} lists took {shortlist_s:.0f} s. Test split, the re-ranked top 100:",
        "",
        "| ranker | " + " | ".join(COLUMNS) + " | fit |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " | --- |",
    ]
    for name, m, note in rows:
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.2f}" if c in m else "-" for c in COLUMNS) + f" | {note} |")
    publish(args.section, "\n".join(lines), args)


if __name__ == "__main__":
    main()
