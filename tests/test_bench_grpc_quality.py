"""bench/grpc_load.py --quality: a real `elias serve` child answers a tiny text index's test split with the same R@100
(and the same top-100 lists) as the index searched in-process, and the section lands in the file given."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_quick import section
from test_index_reranker import N_TEST, make_model_dir, write_dataset

from index_builder.build import build_index

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "## EURLEX57K over gRPC"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny JSON-lines dataset and an fp32 index (tf-idf encoder and ELIAS++ re-ranker) built from it."""
    base = tmp_path_factory.mktemp("grpc-quality")
    dataset = write_dataset(base / "data")
    index = build_index(make_model_dir(base / "model", dataset), base / "index", dtype="fp32", progress=False)
    return Path(index), dataset


def test_quality_over_grpc_equals_in_process(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    index, dataset = tiny
    out = tmp_path / "B.md"
    before = BENCHMARKS.read_bytes() if BENCHMARKS.exists() else None
    args = ["--quality", str(index), str(dataset), "--batch", "16", "--threads", "1", "--benchmarks-file", str(out)]
    res = subprocess.run([sys.executable, "bench/grpc_load.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert (BENCHMARKS.read_bytes() if BENCHMARKS.exists() else None) == before

    body = section(out.read_text(), SECTION)
    assert f"Command: `python bench/grpc_load.py {' '.join(args)}`." in body
    assert re.search(r"Machine: [^\n]+, \d+ cores, 1-min load average [\d.]+ before the run\.", body)
    assert re.search(r"Date: \d{4}-\d{2}-\d{2}\.", body)
    assert f": {N_TEST:,} queries" in body
    assert "ELIAS++ (the index's re-ranker" in body and "rows answered by ELIAS++." in body
    r100 = {}
    for path in ("in-process", "gRPC"):
        m = re.search(rf"^\| {path} [^|]+ \| (\d+\.\d{{4}}) \| \d+\.\d{{2}} \| \d+\.\d{{2}} \| \d+\.\d{{2}} \| "
                      r"\d+\.\d{2} \|$", body, re.M)
        assert m, body
        r100[path] = float(m.group(1))
    assert r100["gRPC"] == r100["in-process"] > 0
    assert "R@100 difference (gRPC - in-process): +0.0000 points." in body
    assert f"Queries whose top-100 id lists differ: 0 of {N_TEST:,}." in body
