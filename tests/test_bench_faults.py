"""bench/faults.py --quick: real SIGKILLed `elias build-index` children over an existing index, a full disk and a
read-only mount, on a tiny model; each case's row lands in the given file (the pattern of test_bench_quick.py)."""

from __future__ import annotations

import re
from pathlib import Path

from test_bench_quick import has_row, run_quick, section
from test_index_builder import tiny_model_dir


def test_faults_quick_run_kills_builds_and_the_previous_index_survives(tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path / "model")
    body = section(run_quick("faults.py", tmp_path / "B.md", "--model", str(model)), "## Reliability: faults")
    assert has_row(body, r"^\| all \| 2 \| 2/2 \| 2/2 \|$"), body  # every kill: the index loads and verifies
    assert re.search(r"the next build \([^)]*\) left 0 entries beside OUT, and the index loads and verifies", body)
    assert has_row(body, r"^\| full disk: injected ENOSPC on the 2nd chunk written \| exit 2, one `error:` line; "
                         r"previous index intact, verifies, nothing left beside it \| `error: \S+/idx: no space left "
                         r"on device"), body
    # the mounts need the right to mount (root in these containers); without it the rows say "not run"
    tmpfs = re.search(r"^\| full disk: real tmpfs [^|]+\| ([^|]+) \|", body, re.M)
    assert tmpfs is not None, body
    assert tmpfs.group(1).startswith(("exit 2, one `error:` line; previous index intact", "not run: ")), body
    ro = [m.group(1) for m in re.finditer(r"^\| read-only bind mount: [^|]+\| ([^|]+) \|", body, re.M)]
    assert ro and (all(not r.startswith(("NOT", "FAIL")) and "CHANGED" not in r and "FAILED" not in r for r in ro)
                   and (len(ro) == 5 or ro[0].startswith("not run: "))), body
