"""bench/scale.py and the machine ceiling of bench/report.py: a --quick run writes its section, rows and plot;
the exhaustive ELIAS answer the recall is measured against is the one `search` gives with beam = C, K = L."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from elias_retrieval.search import search
from elias_retrieval.synthetic import synthetic_queries, synthetic_tensors

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshot() -> tuple[bytes, int] | None:
    return (BENCHMARKS.read_bytes(), BENCHMARKS.stat().st_mtime_ns) if BENCHMARKS.exists() else None


def test_quick_run_writes_the_section_rows_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "B.md", tmp_path / "plots" / "scale.png"
    before = _snapshot()
    res = subprocess.run([sys.executable, "bench/scale.py", "--quick", "--benchmarks-file", str(out), "--plot",
                          str(png)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert _snapshot() == before, "the repository's BENCHMARKS.md was modified"
    text = out.read_text()
    assert text.count("\n## Scale sweep\n") == 1, text
    body = text.split("\n## Scale sweep\n", 1)[1]
    assert f"Command: `python bench/scale.py --quick --benchmarks-file {out} --plot {png}`." in body
    assert re.search(r"Machine: [^\n]+, \d+ cores, 1-min load average [\d.]+ before the run\.", body)
    assert re.search(r"Date: \d{4}-\d{2}-\d{2}\.", body)
    assert re.search(r"^Machine ceiling \(measured at the start of the run\): fp32 GEMM [\d,]+ GFLOP/s", body, re.M)
    for L in ("2,000", "5,000"):
        for method in ("ELIAS", "HNSW"):
            assert re.search(rf"^\| {L} \| [\d,]+ \| {method} \(.+\|$", body, re.M), (L, method, body)
    # HNSW against its own exact answer (w.phi + b over the same W_L): the ids must be label ids on both sides.
    hnsw = [row.split("|") for row in body.splitlines() if row.startswith("| ") and " HNSW (" in row]
    assert hnsw and all(float(cells[12]) > 0.9 for cells in hnsw), hnsw
    assert "At L = 5,000 (the largest L of this run): ELIAS batch-1 p50 = " in body
    assert re.search(r"The same batch-1 queries with 2 torch threads: p50 = \d+\.\d{3} ms \((meets|misses) the "
                     r"target\), p99 = \d+\.\d{3} ms\.", body)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(png.parent.glob(".*.tmp"))  # the atomic write left no temp file


def test_machine_ceiling_is_positive() -> None:
    report = _load("report")
    c = report.machine_ceiling(gemm_n=128, copy_mib=4, reps=1)
    for key in ("gemm_flops", "gemm_flops_1t", "bandwidth", "bandwidth_1t", "threads"):
        assert c[key] > 0, (key, c)
    line = report.ceiling_line(c)
    assert "GFLOP/s" in line and "GB/s" in line and "4 MiB" in line


@pytest.mark.parametrize("max_elems", [1 << 25, 3000])  # one chunk; many chunks of queries, clusters and labels
def test_exhaustive_topk_is_search_over_every_cluster_and_label(max_elems: int) -> None:
    scale = _load("scale")
    t = synthetic_tensors(3000, dim=16, kappa=60, seed=2)
    q, _ = synthetic_queries(t, 12, seed=5)
    elias, ip = scale.exhaustive_topk(q, t, 50, max_elems=max_elems)
    full = search(q, t, k=50, beam_size=t.num_clusters, shortlist_size=t.num_labels)
    assert scale.recall_at(elias.numpy(), full.ids.numpy()) == 1.0
    exact = torch.topk(q @ t.W_L.float().T + t.b_L, 50, dim=1).indices
    assert scale.recall_at(ip.numpy(), exact.numpy()) == 1.0
    assert scale.recall_at(ip.numpy(), elias.numpy()) < 1.0  # the two answers differ: the path term matters
