"""Shared pieces of the benchmark scripts: the machine line and its measured ceiling, batch-1 timing and its
percentiles, the command, --quick sizes and replacing one section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from elias_retrieval.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    """CPU model, the vector instructions torch uses, core count, L3 size and the load average just before the
    run (the machines are shared and noisy, and not always the same CPU: the ISA decides e.g. whether half
    precision products are fast)."""
    import torch

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        out, model = "", platform.processor() or "unknown CPU"
    l3 = re.search(r"L3 cache:\s*([0-9.]+ \w+)", out)
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"{model} ({isa}{', L3 ' + l3.group(1) if l3 else ''}), {os.cpu_count()} cores, 1-min load average "
            f"{os.getloadavg()[0]:.2f} before the run")


def accelerator(device: str) -> str:
    """The GPU behind a torch `device` ("cuda", "cuda:1"), as nvidia-smi and torch name it: model, driver, torch and
    CUDA versions; "CPU" for a CPU device."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return "CPU"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    try:
        query = ["nvidia-smi", f"--id={index}", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
        name, driver = (v.strip() for v in out.split(",", 1))
    except (OSError, subprocess.SubprocessError, ValueError):
        name, driver = torch.cuda.get_device_name(index), "unknown"
    return f"{name} (driver {driver}, torch {torch.__version__}, CUDA {torch.version.cuda})"


def time_each(fn: Callable[[np.ndarray], Any], queries: np.ndarray, warm: int) -> list[float]:
    """Seconds of `fn` on each query as a batch of one, after `warm` untimed calls on the first queries."""
    for q in queries[:warm]:
        fn(q[None])
    ts = []
    for q in queries[warm:]:
        t0 = time.perf_counter()
        fn(q[None])
        ts.append(time.perf_counter() - t0)
    return ts


def time_interleaved(
    fns: dict[str, Callable[[np.ndarray], Any]], queries: np.ndarray, warm: int
) -> dict[str, list[float]]:
    """`time_each` for several variants at once: every query goes through each of them, in an order that rotates
    from query to query, so that a slow spell of a noisy machine falls on all of them alike."""
    names = list(fns)
    for q in queries[:warm]:
        for name in names:
            fns[name](q[None])
    ts: dict[str, list[float]] = {name: [] for name in names}
    for i, q in enumerate(queries[warm:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[name](q[None])
            ts[name].append(time.perf_counter() - t0)
    return ts


def percentiles(ts: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds of durations in seconds."""
    a = np.asarray(ts) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _best_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # first call: page faults, thread pool start-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_ceiling(gemm_n: int = 2048, copy_mib: int = 256, reps: int = 3) -> dict[str, float]:
    """This machine's measured fp32 GEMM FLOP/s and memory bandwidth, with all cores and with 1 thread.

    GEMM: best of `reps` (n, n) @ (n, n) torch matmuls, 2 n^3 FLOPs each. Bandwidth: best of `reps` torch
    copies of a `copy_mib` MiB float32 buffer, counting the bytes read plus the bytes written. A few seconds
    at the defaults; torch's thread count is restored afterwards. Keys: gemm_flops, gemm_flops_1t (FLOP/s),
    bandwidth, bandwidth_1t (bytes/s), threads, and the sizes gemm_n, copy_mib.
    """
    import torch

    before = torch.get_num_threads()
    threads = os.cpu_count() or before
    a, b = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n)
    out = torch.empty(gemm_n, gemm_n)
    src = torch.ones(copy_mib << 18)
    dst = torch.zeros_like(src)  # both written once, so no page is first touched inside the timed copies
    res: dict[str, float] = {"threads": float(threads), "gemm_n": float(gemm_n), "copy_mib": float(copy_mib)}
    try:
        with torch.inference_mode():
            for n_threads, suffix in ((threads, ""), (1, "_1t")):
                torch.set_num_threads(n_threads)
                res["gemm_flops" + suffix] = 2 * gemm_n**3 / _best_time(lambda: torch.mm(a, b, out=out), reps)
                res["bandwidth" + suffix] = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), reps)
    finally:
        torch.set_num_threads(before)
    return res


def ceiling_line(c: dict[str, float]) -> str:
    """One sentence giving `machine_ceiling()`'s numbers, for the benchmark sections."""
    t = int(c["threads"])
    n, mib = int(c.get("gemm_n", 2048)), int(c.get("copy_mib", 256))
    return (f"Machine ceiling (measured at the start of the run): fp32 GEMM {c['gemm_flops'] / 1e9:,.0f} GFLOP/s "
            f"with {t} threads, {c['gemm_flops_1t'] / 1e9:,.0f} with 1 (best {n}x{n} matmul); memory bandwidth "
            f"{c['bandwidth'] / 1e9:.1f} GB/s with {t} threads, {c['bandwidth_1t'] / 1e9:.1f} with 1 (bytes read + "
            f"written by the best {mib} MiB float32 copy).")


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


def publish(title: str, text: str, args: argparse.Namespace) -> None:
    """Write `text` as the `title` section of `args.benchmarks_file`, or print it with `args.no_write`."""
    if args.no_write:
        print(text)
        return
    write_section(title, text, args.benchmarks_file)
    print(f"wrote {title!r} in {args.benchmarks_file}")


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
