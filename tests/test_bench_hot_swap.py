"""bench/hot_swap.py --quick: two tiny bibtex models served through SIGHUP and admin swaps under load, end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_bench_quick import run_quick

BIBTEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "xc" / "bibtex"


@pytest.mark.slow
def test_hot_swap_quick_run_has_no_failed_or_wrong_calls(tmp_path: Path) -> None:
    if not BIBTEX.is_dir():
        pytest.skip(f"real data not found at {BIBTEX}")
    text = run_quick("hot_swap.py", tmp_path / "B.md")
    body = text.split("## Reliability: hot swap\n", 1)[1]
    assert "| failed calls | 0 |" in body and "| hits not equal | 0 |" in body
    assert re.search(r"the two versions' top-20 lists differ on [1-9]\d* of them", body)
    assert re.search(r"\| calls \| [\d,]+ \([\d,]+ by \w+, [1-9][\d,]* by \w+\) \|", body)  # both versions answered
    assert "2 by flipping the symlink and sending SIGHUP, 2 through elias.v1.Admin/ReloadIndex" in body
    assert "sha256 mismatch" in body and "FAILED_PRECONDITION" in body and ": pass." in body
