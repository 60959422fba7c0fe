"""bench/xrlinear.py: PECOS XR-Linear in its own venv, end to end on a slice of real Bibtex.

The first run creates `.bench-venv/` (pip, about 25-40 s); later runs take a few seconds. Skips only when libpecos
(or its pinned dependencies) cannot be installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIBTEX = ROOT.parent / "shared" / "data" / "xc" / "bibtex"

pytestmark = pytest.mark.slow


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_xrlinear", ROOT / "bench" / "xrlinear.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


xr = _load_bench()


@pytest.fixture(scope="module")
def bench_python() -> Path:
    try:
        return xr.ensure_venv()
    except xr.PecosInstallError as exc:
        pytest.skip(f"libpecos cannot be installed into .bench-venv: {str(exc)[:500]}")


def test_xrlinear_bibtex_slice(bench_python: Path) -> None:
    if not BIBTEX.is_dir():
        pytest.skip(f"real data not found at {BIBTEX}")
    X_tr, Y_tr = xr.read_xc_bow(BIBTEX / "train.txt.gz", max_rows=1000)
    X_te, Y_te = xr.read_xc_bow(BIBTEX / "test.txt.gz", max_rows=200)
    X_tr, X_te = xr.tfidf(X_tr, X_te)
    num_labels = Y_tr.shape[1]
    assert (X_tr.shape, Y_tr.shape, X_te.shape) == ((1000, 1836), (1000, 159), (200, 1836))

    topk = 200  # more than the 159 labels: every row must end in -1 padding
    r = xr.run_xrlinear(X_tr, Y_tr, X_te, beam=10, topk=topk, threads=1, X_dev=X_te[:20])

    assert r.test_ids.shape == r.test_scores.shape == (200, topk)
    assert r.test_ids.dtype == np.int32 and r.test_scores.dtype == np.float32
    pad = r.test_ids < 0
    assert np.all(r.test_ids[pad] == -1) and np.all(r.test_ids[~pad] < num_labels)
    assert np.array_equal(pad, np.isneginf(r.test_scores))  # -1 ids <=> -inf scores
    assert np.all(pad[:, num_labels:])
    assert not np.any(pad[:, :-1] & ~pad[:, 1:])  # padding only at the end of a row
    assert pad.sum(1).max() < topk  # every query got predictions
    for ids, scores, valid in zip(r.test_ids, r.test_scores, ~pad, strict=True):
        assert len(np.unique(ids[valid])) == valid.sum()
        assert np.all(np.diff(scores[valid]) <= 0)
    assert r.dev_ids is not None and np.array_equal(r.dev_ids, r.test_ids[:20])

    m = xr.precision_recall(r.test_ids, Y_te)
    popular = np.argsort(-np.asarray(Y_tr.sum(0)).ravel())[None, :topk].repeat(200, 0)
    base = xr.precision_recall(popular, Y_te)
    # Measured: P@1 54 on this slice; the most popular labels give 11; random guessing about 1.5.
    assert m["P@1"] > 30.0 and m["P@1"] > 3 * base["P@1"], (m, base)
    assert m["P@5"] > base["P@5"], (m, base)

    assert r.params["beam"] == 10 and r.params["nr_splits"] == 16 and r.params["max_leaf_size"] == 100
    assert r.params["numpy_version"].startswith("1.")
    assert r.train_s > 0 and r.predict_ms_per_query > 0 and r.peak_rss_mb > 0 and r.wall_s >= r.train_s
