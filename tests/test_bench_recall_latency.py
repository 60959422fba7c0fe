"""bench/recall_latency.py --quick: the quality-vs-latency sweep runs end to end on a synthetic index and writes its
table, the equal-latency comparison and the plot to the given paths (the numbers of a quick run mean nothing)."""

from __future__ import annotations

import re
from pathlib import Path

from test_bench_quick import has_row, run_quick, section

NUM = r"-?\d+\.\d+"


def test_quick_run_writes_the_table_the_comparison_and_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "rl.png"
    text = run_quick("recall_latency.py", tmp_path / "B.md", "--plot", str(plot))
    body = section(text, "## Quality vs latency on EURLEX57K")
    for method, setting in (("ELIAS", r"beam \d+, shortlist \d+"), (r"Flat \(faiss\)", "exact"),
                            (r"HNSW \(faiss\)", r"efSearch \d+"), (r"IVF \(faiss\)", r"nprobe \d+ of \d+")):
        row = rf"^\| {method} \| {setting} \| {NUM} \| {NUM} \| {NUM} \| {NUM} \| [\d,]+ \|$"
        assert has_row(body, row), body
    assert len(re.findall(r"^\| ELIAS \|", body, re.M)) == 3  # the --quick grid
    assert has_row(body, r"^\| XR-Linear \| not run: .+ \| \| \| \| \| \|$"), body  # no sparse features in --quick
    assert "ELIAS vs HNSW at equal p50 latency" in body
    assert re.search(r"the \+4-point goal is \*\*(met|not met)\*\*", body) or "no equal-latency comparison" in body
    assert f"({plot})" in body
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in plot.parent.iterdir()] == ["rl.png"]  # written atomically, no temp file left


def test_a_missing_model_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "bench/recall_latency.py", "--model", str(tmp_path / "nope"), "--no-write"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run bench/quality.py first" in lines[0], res.stderr
