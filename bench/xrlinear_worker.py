"""PECOS XR-Linear train + predict on npz inputs; runs inside `.bench-venv/` (numpy<2), driven by bench/xrlinear.py.

    .bench-venv/bin/python bench/xrlinear_worker.py --workdir DIR [--beam 10 | --beams 1,2,5,10,20] [--topk 100]
        [--nr-splits 16] [--max-leaf-size 100] [--threads 1]

Reads DIR/X_train.npz, DIR/Y_train.npz, DIR/X_test.npz and optionally DIR/X_dev.npz (scipy CSR). Builds PIFA label
features, a hierarchical k-means cluster chain, trains one XLinearModel and beam-searches the top-k labels at each
beam size. Writes, per beam size B, DIR/pred_beamB.npz (and DIR/pred_dev_beamB.npz): `ids` (N, topk) int32 padded
with -1, `scores` (N, topk) float32 padded with -inf, each row sorted by decreasing score; and DIR/timings.json, whose
"beams" maps each B to its predict times.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def topk_arrays(pred: sp.csr_matrix, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense (N, topk) ids/scores from a sparse prediction matrix: rows sorted by score, -1 / -inf padding."""
    pred = sp.csr_matrix(pred)
    n = pred.shape[0]
    ids = np.full((n, topk), -1, dtype=np.int32)
    scores = np.full((n, topk), -np.inf, dtype=np.float32)
    rows = np.repeat(np.arange(n), np.diff(pred.indptr))
    order = np.lexsort((-pred.data, rows))  # by row, then decreasing score
    rank = np.arange(order.size) - pred.indptr[rows[order]]
    keep = rank < topk
    sel = order[keep]
    ids[rows[sel], rank[keep]] = pred.indices[sel]
    scores[rows[sel], rank[keep]] = pred.data[sel]
    return ids, scores


def _load_csr(path: Path) -> sp.csr_matrix:
    mat = sp.load_npz(path).tocsr().astype(np.float32)
    mat.sort_indices()
    return mat


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--beams", default="", help="comma-separated beam sizes, all from one training (overrides --beam)")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--nr-splits", type=int, default=16)
    ap.add_argument("--max-leaf-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    beams = list(dict.fromkeys(int(b) for b in args.beams.split(",") if b.strip())) or [args.beam]
    if min(beams) < 1:
        raise SystemExit(f"beam sizes must be at least 1, got {beams}")

    import pecos
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    wd: Path = args.workdir
    X = _load_csr(wd / "X_train.npz")
    Y = _load_csr(wd / "Y_train.npz")
    X_test = _load_csr(wd / "X_test.npz")
    if X.shape[0] != Y.shape[0] or X.shape[1] != X_test.shape[1]:
        raise SystemExit(f"shape mismatch: X_train {X.shape}, Y_train {Y.shape}, X_test {X_test.shape}")

    t0 = time.perf_counter()
    label_feat = LabelEmbeddingFactory.create(Y, X, method="pifa", threads=args.threads)
    t1 = time.perf_counter()
    chain = Indexer.gen(
        label_feat,
        indexer_type="hierarchicalkmeans",
        nr_splits=args.nr_splits,
        max_leaf_size=args.max_leaf_size,
        threads=args.threads,
    )
    t2 = time.perf_counter()
    model = XLinearModel.train(X, Y.tocsc(), C=chain, threads=args.threads, nr_splits=args.nr_splits)
    t3 = time.perf_counter()
    train_s = t3 - t0

    def predict(Xq: sp.csr_matrix, beam: int) -> tuple[np.ndarray, np.ndarray, float]:
        s = time.perf_counter()
        pred = model.predict(Xq, beam_size=beam, only_topk=args.topk, threads=args.threads)
        elapsed = time.perf_counter() - s
        ids, scores = topk_arrays(pred, args.topk)
        return ids, scores, elapsed

    # Untimed: the first predict call pays one-off costs; no beam size's time should include them.
    if X_test.shape[0]:
        predict(X_test[:64], beams[0])
    X_dev = _load_csr(wd / "X_dev.npz") if (wd / "X_dev.npz").exists() else None
    per_beam: dict[str, dict[str, float]] = {}
    for beam in beams:
        ids, scores, predict_s = predict(X_test, beam)
        np.savez(wd / f"pred_beam{beam}.npz", ids=ids, scores=scores)
        t = {"predict_s": predict_s, "predict_ms_per_query": 1000.0 * predict_s / max(1, X_test.shape[0])}
        if X_dev is not None:
            dev_ids, dev_scores, t["dev_predict_s"] = predict(X_dev, beam)
            np.savez(wd / f"pred_dev_beam{beam}.npz", ids=dev_ids, scores=dev_scores)
        per_beam[str(beam)] = t
    timings: dict[str, object] = {
        "label_embed_s": t1 - t0,
        "index_s": t2 - t1,
        "fit_s": t3 - t2,
        "train_s": train_s,
        "beams": per_beam,
    }
    timings["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    timings["params"] = {
        "pecos_version": pecos.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "label_features": "pifa",
        "indexer": "hierarchicalkmeans",
        "nr_splits": args.nr_splits,
        "max_leaf_size": args.max_leaf_size,
        "beams": beams,
        "topk": args.topk,
        "threads": args.threads,
        "num_train": X.shape[0],
        "num_features": X.shape[1],
        "num_labels": Y.shape[1],
        "num_test": X_test.shape[0],
        "cluster_chain_sizes": [int(c.shape[0]) for c in chain],
    }
    (wd / "timings.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps({k: v for k, v in timings.items() if k != "params"}), file=sys.stderr)


if __name__ == "__main__":
    main()
