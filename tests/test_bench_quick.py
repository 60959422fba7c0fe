"""bench/*.py --quick: each benchmark script runs end to end at tiny sizes and writes its table to the file given by
--benchmarks-file, recording the command, the machine and the date, and leaves the repository's BENCHMARKS.md alone.

Each script runs as a subprocess, the way `make bench` runs it. The numbers of a quick run mean nothing; only the
shape of what lands in the file is checked.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
EURLEX = ROOT.parent / "shared" / "data" / "eurlex57k"


def _snapshot() -> tuple[bytes, int] | None:
    return (BENCHMARKS.read_bytes(), BENCHMARKS.stat().st_mtime_ns) if BENCHMARKS.exists() else None


def run_quick(script: str, out: Path, *extra: str) -> str:
    """Run `python bench/SCRIPT --quick --benchmarks-file OUT EXTRA...` from the repository root; OUT's text."""
    args = ["--quick", "--benchmarks-file", str(out), *extra]
    before = _snapshot()
    res = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"bench/{script} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert _snapshot() == before, "the repository's BENCHMARKS.md was modified"
    text = out.read_text()
    assert text.startswith("# Benchmarks\n")
    assert f"Command: `python bench/{script} {' '.join(args)}`." in text
    assert re.search(r"Machine: [^\n]+, \d+ cores, 1-min load average [\d.]+ before the run\.", text)
    assert re.search(r"Date: \d{4}-\d{2}-\d{2}\.", text)
    return text


def section(text: str, title: str) -> str:
    """The body of one `## ` section (asserting it is there exactly once)."""
    assert text.count(f"\n{title}\n") == 1, f"{title!r} not found once in:\n{text}"
    body = text.split(f"\n{title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def has_row(body: str, pattern: str) -> bool:
    return re.search(pattern, body, re.M) is not None


SYNTHETIC = [
    ("search_latency.py", "## In-process search latency", [
        r"^\| 1 \| 2 \| \d+\.\d{3} \| \d+\.\d{3} \| [\d,]+ \| \|$",
        r"^\| 20 \| 500 \| \d+\.\d{3} \| \d+\.\d{3} \| [01]\.\d{4} \|$",  # an operating point and its recall
    ]),
    ("grpc_load.py", "## gRPC serving", [
        r"^\| gRPC `Search`, one client \| \d+\.\d{3} \| \d+\.\d{3} \| \|$",
        r"^\| of which the framework floor: an empty `GetIndexInfo` call, one client"
        r" \| \d+\.\d{3} \| \d+\.\d{3} \| \|$",
        # the server child timed its own searches and handed them back
        r"^\| the same searches timed inside the server \(`Searcher.search_checked`\)"
        r" \| \d+\.\d{3} \| \d+\.\d{3} \| \|$",
        # and the same queries in a loop in that process, with the ratio
        r"^\| the same queries in a loop in the server process afterwards .* \| \d+\.\d{3} \| \d+\.\d{3} \| \|$",
        r"^\| search inside the server / that loop \(p50s\) \| \d+\.\d{2}x \| \| \|$",
        r"^\| gRPC `Search` less the floor and that loop \(p50s\) \| [+-]\d+\.\d{3} \| \| \|$",
        r"^\| search inside the server / that loop with the wait \(p50s\) \| \d+\.\d{2}x \| \| \|$",
        # the handler timed inside the server, and the bare echo of a Search's bytes
        r"^\| the Search handler inside the server .* \| \d+\.\d{3} \| \d+\.\d{3} \| \|$",
        r"^\| a bare echo call on raw bytes, as large as a Search's \([\d,]+ bytes in, [\d,]+ out\), one client"
        r" \| \d+\.\d{3} \| \d+\.\d{3} \| \|$",
        r"^\| gRPC `Search` less the echo and the handler \(p50s\).* \| [+-]\d+\.\d{3} \| \| \|$",
    ]),
    ("index_load.py", "## Index size and load time", [r"^\| fp16 \| cold \| \d+\.\d{4} \| \d+\.\d{3} \| "]),
    ("text_latency.py", "## Text queries over gRPC, by encoder", [
        r"^\| tiny TIBKAT index \| tfidf \| (yes|no) \| \d+\.\d{2} \| \d+\.\d{2} \| \d+ \| \d+\.\d{2} \| \d+\.\d{2} "
        r"\| 0 \|$",  # no failed call under load
    ]),
]


@pytest.mark.parametrize(("script", "title", "rows"), SYNTHETIC, ids=[s[0].removesuffix(".py") for s in SYNTHETIC])
def test_quick_run_writes_its_table_to_the_given_file(tmp_path: Path, script: str, title: str, rows: list[str]) -> None:
    text = run_quick(script, tmp_path / "B.md")
    for row in rows:
        assert has_row(section(text, title), row), (row, text)


def test_write_section_replaces_its_section_and_keeps_the_others(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    write_section = report.write_section
    out = tmp_path / "B.md"
    write_section("## A", "first", out)  # a missing file starts as "# Benchmarks"
    write_section("## B", "kept", out)
    write_section("## A", "second", out)
    assert out.read_text() == "# Benchmarks\n\n## A\n\nsecond\n\n## B\n\nkept\n"


@pytest.fixture(scope="module")
def eurlex_quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """One quick quality run (ELIAS only, 2,000 EURLEX57K training points): its run directory and its table file."""
    if not EURLEX.is_dir():
        pytest.skip(f"real data not found at {EURLEX}")
    tmp = tmp_path_factory.mktemp("bench-eurlex57k")
    text = run_quick("quality.py", tmp / "B.md", str(EURLEX), "--skip-xrlinear",
                     "--out", str(tmp / "run"))
    yield tmp / "run", text


@pytest.mark.slow
def test_quality_quick_run_writes_the_elias_rows(eurlex_quick: tuple[Path, str]) -> None:
    run_dir, text = eurlex_quick
    body = section(text, "## Quality on EURLEX57K")
    for method in ("ELIAS++", "ELIAS"):
        assert has_row(body, rf"^\| {re.escape(method)} \| \d+\.\d\d \| "), body
    assert "| XR-Linear" not in body and "Ratios to XR-Linear" not in body  # --skip-xrlinear
    assert (run_dir / "model" / "model.json").is_file()


@pytest.mark.slow
def test_index_dtype_quality_quick_run_on_the_quality_model(eurlex_quick: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = eurlex_quick
    text = run_quick("index_load.py", tmp_path / "B.md", "--quality", str(run_dir / "model"), str(EURLEX))
    body = section(text, "## Index dtype quality")
    for dtype in ("fp32", "fp16", "int8"):
        assert has_row(body, rf"^\| {dtype} \| [\d.]+ \| \d+\.\d\d \| "), body
    assert "(200 points)" in body  # --quick evaluates the first 200 test points


TIBKAT = ROOT.parent / "shared" / "data" / "tibkat"


@pytest.mark.slow
def test_train_profile_quick_run_writes_both_stages(tmp_path: Path) -> None:
    if not TIBKAT.is_dir():
        pytest.skip(f"real data not found at {TIBKAT}")
    body = section(run_quick("train_profile.py", tmp_path / "B.md"), "## Training step profile")
    for stage in (1, 2):
        assert has_row(body, rf"^\| {stage} \| \d+\.\d{{3}} \| [\d,]+ \| [\d,]+ \| [\d,]+ \|$"), body
        assert f"Stage {stage}, the 12 operators with the most CPU time" in body
    assert "L = 32,472" in body  # every TIBKAT training label, from the first 2,000 points' vocabulary


@pytest.mark.slow
def test_recipe_sweep_quick_run_writes_a_row_per_variant(tmp_path: Path) -> None:
    if not EURLEX.is_dir():
        pytest.skip(f"real data not found at {EURLEX}")
    text = run_quick("recipe_sweep.py", tmp_path / "B.md", str(EURLEX), "--only", "defaults", "--only", "dropout-0.5")
    body = section(text, "## Training recipe on EURLEX57K (dev)")
    numbers = r" \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| \d+ \|$"
    assert has_row(body, r"^\| defaults \(embedding dropout 0 over these few epochs\) \| `-`" + numbers), body
    assert has_row(body, r"^\| embedding dropout 0\.5 \(the reference's\) \| `model.embed_dropout=0.5` \| "), body
    assert "| fp32 label products |" not in body  # --only


@pytest.mark.slow
def test_quality_quick_run_on_an_xc_dataset_lists_its_buckets(tmp_path: Path) -> None:
    bibtex = ROOT.parent / "shared" / "data" / "xc" / "bibtex"
    if not bibtex.is_dir():
        pytest.skip(f"real data not found at {bibtex}")
    text = run_quick("quality.py", tmp_path / "B.md", str(bibtex), "--out", str(tmp_path / "run"))
    body = section(text, "## Quality on Bibtex")
    for method in ("ELIAS++", "ELIAS", "XR-Linear \\(beam 10\\)"):
        assert has_row(body, rf"^\| {method} \| \d+\.\d\d \| "), body
    assert has_row(body, r"^\| ELIAS \|( (-|\d+\.\d\d) \|){6}$"), body  # recall by bucket; - for an empty one


@pytest.mark.slow
def test_ranker_fit_quick_run_compares_the_fits_and_depths(tmp_path: Path) -> None:
    bibtex = ROOT.parent / "shared" / "data" / "xc" / "bibtex"
    if not bibtex.is_dir():
        pytest.skip(f"real data not found at {bibtex}")
    body = section(run_quick("ranker_fit.py", tmp_path / "B.md", "--deep-keeps", "0", "--tols", "0.1,0.3"),
                   "## ELIAS++ ranker: fit and depth")
    metrics = r"( \d+\.\d\d \|){5}( (-|\d+\.\d\d) \|){2}"
    assert has_row(body, rf"^\| ELIAS \(no ranker\) \|{metrics}  \|$"), body
    budget = "negatives from rank 50 kept at {} \\(the budget\\)"  # 25 deep negatives a point: 0.5 of 50, 0.25 of 100
    for name in ("sklearn LinearSVC per label", f"batched solver, depth 100, {budget.format('0.5')}, tolerance 0.1",
                 f"batched solver, depth 100, {budget.format('0.5')}, tolerance 0.3",
                 f"batched solver, depth 150, {budget.format('0.25')}, tolerance 0.3"):
        assert has_row(body, rf"^\| {name} \|{metrics} [\d.]+ s, \d threads?; pruned at [\d.]+ "), body


def test_encoders_quick_run_compares_bf16_and_the_encoders(tmp_path: Path) -> None:
    text = run_quick("encoders.py", tmp_path / "B.md", "--encoders", "tfidf,hybrid", "--skip-xrlinear",
                     "--out", str(tmp_path / "runs"))
    body = section(text, "## Encoders on EURLEX57K")
    assert has_row(body, r"^\| embedding, 128 tokens, .* \| \d+\.\d{2} \| \d+\.\d{2} \| \d+\.\d{2}x faster; cosine")
    assert has_row(body, r"^\| training step, 256 tokens, batch \d+ \(examples/s\) \| \d+\.\d \| \d+\.\d \|")
    assert has_row(body, r"^\| ELIAS\+\+, tf-idf \(default\) \| \d+\.\d{2} \|")
    assert has_row(body, r"^\| ELIAS\+\+, hybrid \(tf-idf \+ frozen MiniLM\) \| (\d+\.\d{2} \| ){5}\d+ \| "
                         r"\d+\.\d{2} \| \d+\.\d{2} \| embedding the splits \d+ s")
