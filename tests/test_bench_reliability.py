"""bench/fuzz_grpc.py and bench/serve_load.py --quick against a real `elias serve` child on one tiny trained index:
the fuzzer finds no crash, no INTERNAL/UNKNOWN and no unexpected status code, and the load run sees no error and
rejects the overload with RESOURCE_EXHAUSTED. Both exit non-zero on any of those, and write their tables to the
given file, never to the repository's BENCHMARKS.md."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bench_quick import has_row, run_quick, section

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_index(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from tiny_index import tiny_text_index
    finally:
        sys.path.remove(str(ROOT / "bench"))
    work = tmp_path_factory.mktemp("tiny-index")
    yield tiny_text_index(work)


@pytest.mark.slow
def test_fuzz_quick_run_finds_no_crash_and_no_unexpected_status(tiny_index: Path, tmp_path: Path) -> None:
    body = section(run_quick("fuzz_grpc.py", tmp_path / "B.md", "--index", str(tiny_index)),
                   "## Reliability: fuzzing")
    row = re.search(r"^\| \*\*all\*\* \| \*\*([\d,]+)\*\* \|(.*)\| \*\*(\d+)\*\* \|$", body, re.M)
    assert row, body
    assert int(row.group(1).replace(",", "")) == 300 and row.group(3) == "0"  # every call, none unexpected
    # no column for any other code (INTERNAL, UNKNOWN, UNAVAILABLE, ...)
    assert has_row(body, r"^\| family \| calls \| OK \| INVALID_ARGUMENT \| RESOURCE_EXHAUSTED \| DEADLINE_EXCEEDED "
                         r"\| CANCELLED \| unexpected \|$"), body
    for family in ("valid", "raw bytes", "mutated bytes", "sparse", "embedding", "batch"):
        assert has_row(body, rf"^\| {family} \| \d+ \| "), (family, body)
    assert "health at the end: SERVING" in body and "Server crashes: 0" in body
    assert re.search(r"Shutdown: SIGTERM while 40 valid calls were sent: .*; exit status 0\.", body), body


@pytest.mark.slow
def test_serve_load_quick_run_has_no_errors_and_rejects_the_overload_at_once(tiny_index: Path,
                                                                               tmp_path: Path) -> None:
    data = tiny_index.parent / "data"
    body = section(run_quick("serve_load.py", tmp_path / "B.md", "--index", str(tiny_index), "--data", str(data)),
                   "## Reliability: sustained load")
    assert len(re.findall(r"\*\*: [\d,]+ calls in [\d.]+ s, 0 errors, ", body)) == 2, body  # text and embedding
    assert has_row(body, r"^\| 0-1 \| [\d,]+ \| [\d,.]+ \| [\d.]+ \| [\d.]+ \|$"), body
    assert has_row(body, r"^\| admitted \(OK\): latency \| [1-9][\d,]* \| "), body
    assert has_row(body, r"^\| rejected \(RESOURCE_EXHAUSTED\): time to the rejection \| [1-9][\d,]* \| "), body
    assert has_row(body, r"^\| other codes \| 0 \| \| \|$"), body
