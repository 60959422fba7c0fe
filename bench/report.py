"""Shared pieces of the benchmark scripts: the machine line, the command, --quick sizes and replacing one section
of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from elias_retrieval.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    """CPU model, core count and the load average just before the run (the machines are shared and noisy)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f} before the run"


def command_line() -> str:
    """The command that produced a table, as a reader would type it from the repository root."""
    script = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def today() -> str:
    return date.today().isoformat()


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the `title` section (a `## ` heading) of `path`, leaving the others; atomic."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{title}\n\n{body.strip()}\n"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + block + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    write_text(path, text)


def add_index_args(ap: argparse.ArgumentParser) -> None:
    """The synthetic index and search parameters shared by the latency and serving benchmarks."""
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=16384)
    ap.add_argument("--kappa", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--shortlist", type=int, default=2000)


def parse_args(ap: argparse.ArgumentParser, quick: dict[str, Any], argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `ap`; with --quick, the sizes in `quick` replace the defaults (flags given explicitly still win)."""
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**quick)
        args = ap.parse_args(argv)
    return args
