"""bench/gpu_check.sh --dry-run: the GPU check runs end to end on the CPU, so that it does not rot between the days
a GPU machine is lent. Every step is reported in the summary; the steps that run here in a tiny form pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("setup", "cuda-tests", "search-latency", "finetune", "faiss-gpu")


def test_dry_run_reports_every_step_in_the_summary_and_exits_0(tmp_path: Path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    before = (ROOT / "BENCHMARKS.md").stat().st_mtime_ns
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("## GPU check (dry run")
    assert re.search(r"Device: [^\n]+; torch [^\n]+ Command: `bash bench/gpu_check.sh --dry-run`\.", md), md
    for step in STEPS:
        row = re.search(rf"^\| {step} \| (pass|skip|fail) \| \d+\.\d \| ([^\n]*) \|$", md, re.M)
        assert row, (step, md)
        assert row.group(1) != "fail", (step, md)
    # The steps that run here leave their measurements: the CUDA tests (skipped on the CPU) and the tiny search.
    assert re.search(r"^\| cuda-tests \| pass \| [\d.]+ \| cuda tests: 0 passed, 0 failed, [1-9]\d* skipped \|$", md,
                     re.M), md
    assert re.search(r"^\| search-latency \| pass \| [\d.]+ \| batch 1: p50 [\d.]+ ms", md, re.M), md
    assert "### In-process search latency (cpu)" in md
    log = (out / "gpu_check.log").read_text()
    for step in STEPS:
        assert f"== {step}: " in log and (out / "logs" / f"{step}.log").exists()
    assert (ROOT / "BENCHMARKS.md").stat().st_mtime_ns == before, "the repository's BENCHMARKS.md was modified"
