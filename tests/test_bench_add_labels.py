"""bench/add_labels.py --quick: held-out EURLEX57K labels added back to a tiny index; the table lands in the given file
(its numbers mean nothing at this size; only its shape is checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_bench_quick import EURLEX, has_row, run_quick, section

pytestmark = pytest.mark.slow


def test_add_labels_quick_run_writes_every_row(tmp_path: Path) -> None:
    if not EURLEX.is_dir():
        pytest.skip(f"real data not found at {EURLEX}")
    body = section(run_quick("add_labels.py", tmp_path / "B.md", "--full-model", str(tmp_path / "full")),
                   "## Adding labels to a built index")
    num = r"\d+\.\d\d"
    for method in ("(a) ELIAS, full retrain with every label", "(a) ELIAS++, full retrain with every label",
                   "ELIAS, without the held-out labels", "ELIAS, labels added, closed form",
                   "ELIAS++, labels added, refined (200 logistic steps)",
                   "Flat (faiss) over W_L, labels added, refined", "HNSW (faiss) over W_L, labels added, refined"):
        assert has_row(body, rf"^\| {re.escape(method)} \| {num} \| {num} \| {num} \| {num} \| {num} \|$"), body
    without = rf"^\| ELIAS, without the held-out labels \| {num} \| {num} \| 0\.00 \| 0\.00 \| {num} \|$"
    assert has_row(body, without), body
    assert re.search(r"Time: training the model [\d,.]+ s \+ building its index [\d.]+ s, against adding the 13 "
                     r"labels [\d.]+ s in closed form, [\d.]+ s refined", body), body
    removal = re.search(r"Removing the 13 labels again \(`remove_labels` on the refined index, [\d.]+ s\): in "
                        r"([\d,]+) test searches .* no result names a removed label \(asserted\)\. R@100 of the other "
                        rf"labels: ELIAS ({num}) after removal, ({num}) before it", body)
    assert removal, body
    assert float(removal.group(2)) >= float(removal.group(3))  # fewer competitors: the others can only gain
