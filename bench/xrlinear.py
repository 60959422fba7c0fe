"""PECOS XR-Linear baseline, run in its own virtual environment (libpecos pins numpy<2).

    .venv/bin/python bench/xrlinear.py --dataset bibtex          # tf-idf over the given BoW features, beam 10
    .venv/bin/python bench/xrlinear.py --dataset delicious --threads 2
    .venv/bin/python bench/xrlinear.py --dataset bibtex --beams 1,2,5,10,20   # one training, five beam sizes

`ensure_venv` creates `.bench-venv/` at the repo root on first use (`python -m venv`, then pinned pip installs;
about 25 s, 330 MB). libpecos is installed with `--no-deps`: its declared torch/transformers/datasets/peft
dependencies serve only XR-Transformer and would add about 6 GB; XR-Linear needs numpy, scipy and scikit-learn.
`run_xrlinear` writes the inputs to a work directory and runs bench/xrlinear_worker.py there in a subprocess;
`run_xrlinear_beams` does the same but predicts at several beam sizes from one training.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "xrlinear_worker.py"
VENV_DIR = ".bench-venv"
DATA_XC = ROOT.parent / "shared" / "data" / "xc"

# Verified together on CPython 3.11 (Linux x86_64); scikit-learn 1.9.1 needs Python >= 3.11. libpecos goes in last
# with --no-deps (see module docstring).
PIP_PINS = (
    "numpy==1.26.4",
    "scipy==1.13.1",
    "scikit-learn==1.9.1",
    "joblib==1.6.0",
    "threadpoolctl==3.8.0",
    "cloudpickle==3.1.3",
    "narwhals==2.29.0",
)
PECOS_PIN = "libpecos==1.2.8"
_READY = ".xrlinear-ready"


class PecosInstallError(RuntimeError):
    """pip could not install libpecos (or its pinned dependencies) into the bench venv."""


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip(py: Path, *args: str) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-20:])
        raise PecosInstallError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{tail}")


def ensure_venv(root: Path = ROOT) -> Path:
    """Return the python of `root/.bench-venv`, creating it and installing the pinned libpecos if missing."""
    venv = root / VENV_DIR
    py = _venv_python(venv)
    spec = " ".join((*PIP_PINS, PECOS_PIN))
    ready = venv / _READY
    if py.exists() and ready.exists() and ready.read_text().strip() == spec:
        return py
    venv.mkdir(parents=True, exist_ok=True)
    with open(venv / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same venv
        if py.exists() and ready.exists() and ready.read_text().strip() == spec:
            return py
        t0 = time.perf_counter()
        if not py.exists():
            print(f"[xrlinear] creating {venv} ...", file=sys.stderr, flush=True)
            res = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"python -m venv {venv} failed:\n{res.stderr.strip()}")
        print(f"[xrlinear] pip install {spec} ...", file=sys.stderr, flush=True)
        _pip(py, *PIP_PINS)
        _pip(py, "--no-deps", PECOS_PIN)
        res = subprocess.run(
            [str(py), "-c", "import pecos.xmc.xlinear, pecos; print(pecos.__version__)"], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise PecosInstallError(f"libpecos installed but does not import:\n{res.stderr.strip()[-2000:]}")
        ready.write_text(spec + "\n")
        print(
            f"[xrlinear] bench venv ready (pecos {res.stdout.strip()}) in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return py


@dataclass
class XRLinearResult:
    """Top-k predictions (ids padded with -1, scores with -inf, rows by decreasing score) and costs."""

    test_ids: np.ndarray
    test_scores: np.ndarray
    dev_ids: np.ndarray | None
    dev_scores: np.ndarray | None
    train_s: float  # PIFA label features + hierarchical k-means + model training
    predict_ms_per_query: float  # test split, beam search, in-process
    peak_rss_mb: float  # the worker process
    wall_s: float  # the whole subprocess, including loading and writing (and every beam size of its run)
    params: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _csr32(X: sp.spmatrix) -> sp.csr_matrix:
    return sp.csr_matrix(X, dtype=np.float32)


def _load_pred(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["ids"], z["scores"]


def run_xrlinear(
    X_train: sp.spmatrix,
    Y_train: sp.spmatrix,
    X_test: sp.spmatrix,
    *,
    beam: int = 10,
    topk: int = 100,
    threads: int = 1,
    nr_splits: int = 16,
    max_leaf_size: int = 100,
    X_dev: sp.spmatrix | None = None,
    workdir: Path | None = None,
) -> XRLinearResult:
    """Train XR-Linear on (X_train, Y_train) in the bench venv and return top-k predictions for X_test (and X_dev)."""
    return run_xrlinear_beams(X_train, Y_train, X_test, beams=(beam,), topk=topk, threads=threads,
                              nr_splits=nr_splits, max_leaf_size=max_leaf_size, X_dev=X_dev, workdir=workdir)[0]


def run_xrlinear_beams(
    X_train: sp.spmatrix,
    Y_train: sp.spmatrix,
    X_test: sp.spmatrix,
    *,
    beams: Sequence[int] = (10,),
    topk: int = 100,
    threads: int = 1,
    nr_splits: int = 16,
    max_leaf_size: int = 100,
    X_dev: sp.spmatrix | None = None,
    workdir: Path | None = None,
) -> list[XRLinearResult]:
    """Train XR-Linear once and predict at each beam size; one result per distinct beam, in the given order.

    The training costs (`train_s`, `peak_rss_mb`, `wall_s`) are shared by all results; the predictions,
    `predict_ms_per_query`, `params["beam"]` and the predict timings are each beam's own.
    """
    beams = list(dict.fromkeys(int(b) for b in beams))
    if not beams or min(beams) < 1:
        raise ValueError(f"beam sizes must be at least 1, got {beams}")
    py = ensure_venv()
    with tempfile.TemporaryDirectory(prefix="xrlinear-") as tmp:
        wd = Path(workdir) if workdir is not None else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        for old in (*wd.glob("pred*.npz"), wd / "timings.json", wd / "X_dev.npz"):
            old.unlink(missing_ok=True)
        sp.save_npz(wd / "X_train.npz", _csr32(X_train))
        sp.save_npz(wd / "Y_train.npz", _csr32(Y_train))
        sp.save_npz(wd / "X_test.npz", _csr32(X_test))
        if X_dev is not None:
            sp.save_npz(wd / "X_dev.npz", _csr32(X_dev))
        cmd = [str(py), str(WORKER), "--workdir", str(wd), "--beams", ",".join(map(str, beams)), "--topk", str(topk)]
        cmd += ["--nr-splits", str(nr_splits), "--max-leaf-size", str(max_leaf_size), "--threads", str(threads)]
        n = str(threads) if threads > 0 else str(os.cpu_count() or 1)
        env = dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
        env.pop("PYTHONPATH", None)  # keep the main venv's numpy 2 out of the worker
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall_s = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"xrlinear worker failed (exit {res.returncode}):\n{res.stderr.strip()[-4000:]}")
        timings = json.loads((wd / "timings.json").read_text())
        preds = {b: (_load_pred(wd / f"pred_beam{b}.npz"),
                     _load_pred(wd / f"pred_dev_beam{b}.npz") if X_dev is not None else (None, None))
                 for b in beams}
    params = timings.pop("params")
    per_beam = timings.pop("beams")
    shared = {k: float(v) for k, v in timings.items()}
    out = []
    for b in beams:
        (test_ids, test_scores), (dev_ids, dev_scores) = preds[b]
        own = {k: float(v) for k, v in per_beam[str(b)].items()}
        out.append(XRLinearResult(
            test_ids=test_ids,
            test_scores=test_scores,
            dev_ids=dev_ids,
            dev_scores=dev_scores,
            train_s=shared["train_s"],
            predict_ms_per_query=own["predict_ms_per_query"],
            peak_rss_mb=shared["peak_rss_mb"],
            wall_s=wall_s,
            params={**params, "beam": b},
            timings={**shared, **own},
        ))
    return out


# --- a minimal reader for the Extreme Classification Repository's BoW format (until the project's reader lands) ---


def read_xc_bow(path: Path, max_rows: int | None = None) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(X float32 CSR, Y float32 binary CSR) from an XC BoW file: header `N F L`, then `l1,l2 f:v f:v` (0-based)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        n, num_feat, num_lab = (int(t) for t in f.readline().split())
        n = n if max_rows is None else min(n, max_rows)
        x_ptr, x_idx, x_val, y_ptr, y_idx = [0], [], [], [0], []
        for _ in range(n):
            line = f.readline().rstrip("\n")
            labels, _, feats = line.partition(" ")
            if labels:
                y_idx.extend(int(t) for t in labels.split(","))
            for tok in feats.split():
                i, v = tok.split(":")
                x_idx.append(int(i))
                x_val.append(float(v))
            x_ptr.append(len(x_idx))
            y_ptr.append(len(y_idx))
    X = sp.csr_matrix((np.asarray(x_val, np.float32), np.asarray(x_idx), np.asarray(x_ptr)), shape=(n, num_feat))
    Y = sp.csr_matrix((np.ones(len(y_idx), np.float32), np.asarray(y_idx), np.asarray(y_ptr)), shape=(n, num_lab))
    X.sum_duplicates()
    Y.sum_duplicates()
    Y.data[:] = 1.0
    return X, Y


def tfidf(X_train: sp.csr_matrix, *others: sp.csr_matrix) -> list[sp.csr_matrix]:
    """Sublinear tf-idf fitted on X_train, l2-normalised rows, applied to X_train and each of `others`."""
    from sklearn.feature_extraction.text import TfidfTransformer

    tf = TfidfTransformer(sublinear_tf=True, norm="l2").fit(X_train)
    return [_csr32(tf.transform(m)) for m in (X_train, *others)]


def precision_recall(ids: np.ndarray, Y: sp.spmatrix, ks: tuple[int, ...] = (1, 3, 5)) -> dict[str, float]:
    """P@k in % (over all points; -1 padding is a miss) and R@topk in % (over the points that have labels)."""
    Y = sp.csr_matrix(Y)
    num_labels = np.int64(Y.shape[1])
    gold = np.repeat(np.arange(Y.shape[0], dtype=np.int64), np.diff(Y.indptr)) * num_labels + Y.indices
    pred = np.arange(ids.shape[0], dtype=np.int64)[:, None] * num_labels + ids
    hits = np.isin(pred, gold) & (ids >= 0)
    out = {f"P@{k}": 100.0 * float(hits[:, :k].sum(1).mean()) / k for k in ks}
    nlab = np.diff(Y.indptr)
    out[f"R@{ids.shape[1]}"] = 100.0 * float(np.mean(hits.sum(1)[nlab > 0] / nlab[nlab > 0]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="XR-Linear on an XC BoW dataset (tf-idf over the given features).")
    ap.add_argument("--dataset", default="bibtex", help="a directory under ../shared/data/xc/")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--beams", default="", help="comma-separated beam sizes from one training (overrides --beam)")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    beams = [int(b) for b in args.beams.split(",") if b.strip()] or [args.beam]

    d = DATA_XC / args.dataset
    X_tr, Y_tr = read_xc_bow(d / "train.txt.gz")
    X_te, Y_te = read_xc_bow(d / "test.txt.gz")
    X_tr, X_te = tfidf(X_tr, X_te)
    results = run_xrlinear_beams(X_tr, Y_tr, X_te, beams=beams, topk=args.topk, threads=args.threads)
    several = len(results) > 1
    for r in results:
        metrics = {k: round(v, 2) for k, v in precision_recall(r.test_ids, Y_te).items()}
        per_beam = {"beam": r.params["beam"], "predict_ms_per_query": round(r.predict_ms_per_query, 4)}
        print(json.dumps({"dataset": args.dataset, **(per_beam if several else {}), **metrics}))
    r = results[0]
    predict = f"{len(results)} beam sizes" if several else f"predict {r.predict_ms_per_query:.3f} ms/query"
    print(
        f"train {r.train_s:.2f} s, {predict}, peak RSS {r.peak_rss_mb:.0f} MB, "
        f"worker wall {r.wall_s:.1f} s, pecos {r.params['pecos_version']}, chain {r.params['cluster_chain_sizes']}"
    )


if __name__ == "__main__":
    main()
