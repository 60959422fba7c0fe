"""Faults: SIGKILLed index builds, a full disk, a read-only index (BENCHMARKS.md, "Reliability: faults").

    .venv/bin/python bench/faults.py --model runs/bench-eurlex57k/model --work runs/scratch-faults/work
    .venv/bin/python bench/faults.py --quick --model MODEL_DIR --benchmarks-file /tmp/B.md   # the tests

Kills: `elias build-index MODEL OUT` runs as a child process over an existing OUT. Complete builds are timed
first (when the temporary directory appears, when OUT's inode changes, i.e. the swap, and the exit); then
`--kills` builds get a SIGKILL at seeded random times spread over the measured duration (one per equal slice,
so the final rename is covered too; times past the temporary directory's appearance count from the killed
build's own, see `watch_build`). After each kill: what the kill hit (the killed PID's leftovers beside OUT
and OUT's inode tell), `Searcher.open(OUT)` plus one search, and `elias index verify OUT`. The next build
cleans the dead build's leftovers and must leave none. `elias index verify` and the builds of the full-disk
and read-only cases run in this process (the CLI's own code, without another interpreter start); the killed
builds and `elias serve` are real children.

Full disk: an injected ENOSPC (the index writer raises OSError(ENOSPC) on its second chunk) and, when this
process may mount, a real tmpfs sized to hold the previous index and half of another. Read-only: OUT's parent
bind-mounted read-only; `elias serve`, `Searcher.open` and `elias index verify` on it, the index tree compared
before and after, and a build into it refused in one line. Without mount rights those rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import BENCHMARKS, command_line, machine, parse_args, today, write_section  # noqa: E402

SECTION = "## Reliability: faults"
QUICK = {"kills": 2, "calibrations": 0}
ELIAS = [sys.executable, "-m", "elias_retrieval"]


@dataclass
class Timeline:
    """Seconds from a build child's start: its temporary directory first seen, OUT swapped, the exit."""

    tmp_s: float | None
    swap_s: float | None
    end_s: float
    returncode: int | None = None


def watch_build(model: Path, out: Path, kill_at: float | None = None,
                cal: Timeline | None = None) -> tuple[Timeline, int]:
    """Run `elias build-index MODEL OUT`, watching OUT's directory every ~2 ms; SIGKILL it at `kill_at` s.

    With `cal` (a complete build's timeline) a `kill_at` after `cal`'s temporary directory appeared is taken
    relative to this build's own temporary directory, its distance scaled by this build's start-up time over
    `cal`'s: the machine is shared, and a build's speed changes with the load (a kill meant for the write
    should hit the write).
    """
    ino = out.stat().st_ino if out.exists() else None
    proc = subprocess.Popen([*ELIAS, "build-index", str(model), str(out), "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    tl = Timeline(None, None, 0.0)
    prefix = f".{out.name}.{proc.pid}-"
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if tl.tmp_s is None and any(n.startswith(prefix) for n in os.listdir(out.parent)):
            tl.tmp_s = now
        if kill_at is not None and now >= _kill_time(kill_at, cal, tl):
            proc.send_signal(signal.SIGKILL)
            break
        if tl.swap_s is None and out.exists() and out.stat().st_ino != ino:
            tl.swap_s = now
        time.sleep(0.002)
    err = proc.communicate()[1]
    tl.end_s, tl.returncode = time.perf_counter() - t0, proc.returncode
    if kill_at is None and proc.returncode != 0:
        raise RuntimeError(f"elias build-index exited {proc.returncode}:\n{err[-2000:]}")
    return tl, proc.pid


def _kill_time(kill_at: float, cal: Timeline | None, tl: Timeline) -> float:
    if cal is None or cal.tmp_s is None or kill_at < cal.tmp_s:
        return kill_at
    if tl.tmp_s is None:  # this build has not reached its temporary directory yet
        return float("inf")
    return tl.tmp_s + (kill_at - cal.tmp_s) * tl.tmp_s / cal.tmp_s


def phase(out: Path, pid: int, ino_before: int, tl: Timeline) -> str:
    """What a kill hit, from the killed build's leftovers beside OUT and whether OUT was swapped."""
    if tl.returncode == 0:
        return "finished before the kill"
    left = [out.parent / n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.{pid}-")]
    swapped = out.exists() and out.stat().st_ino != ino_before
    if swapped:
        return "after the swap, deleting the old index" if left else "after the swap and the delete"
    if not left:
        return "before the temporary directory"
    if (left[0] / "manifest.json").exists():
        return "manifest written, before the swap"
    return "mid-write"


def loads(out: Path) -> bool:
    """`Searcher.open(OUT)` and one search."""
    import numpy as np

    from elias_retrieval.searcher import Searcher

    s = Searcher.open(out, device="cpu", resident=False)
    if "text" in s.info.query_kinds:
        res = s.search_texts(["regulation"], k=5)
    else:
        res = s.search_embeddings(np.zeros((1, s.info.dim), dtype=np.float32), k=5)
    return res.ids.shape == (1, 5)


def run_cli(*argv: str) -> tuple[int, str]:
    """Run an `elias` command in this process (the same code as the CLI, without another interpreter start);
    its exit status and stderr (a traceback, should one escape)."""
    from elias_retrieval.cli import app
    from elias_retrieval.cli import index as _register_index_verbs  # noqa: F401

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = app(list(argv), standalone_mode=False)
        except SystemExit as e:
            rc = e.code
        except Exception:
            traceback.print_exc()
            rc = 1
    return int(rc or 0), err.getvalue()


def verifies(out: Path) -> bool:
    """`elias index verify OUT` passes."""
    return run_cli("index", "verify", str(out))[0] == 0


@contextlib.contextmanager
def full_disk_on_second_chunk() -> Iterator[None]:
    """The index writer raises OSError(ENOSPC) on the second chunk it writes (inside the `with`)."""
    from elias_retrieval import index_format as fmt

    real, seen = fmt._write_hashed, [0]

    def full_disk(path: Path, chunks: Iterator[bytes], advance: Any) -> dict[str, Any]:
        def limited() -> Iterator[bytes]:
            for c in chunks:
                seen[0] += 1
                if seen[0] == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                yield c

        return real(path, limited(), advance)

    fmt._write_hashed = full_disk  # type: ignore[assignment]
    try:
        yield
    finally:
        fmt._write_hashed = real  # type: ignore[assignment]


def beside(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n != out.name)


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_mode)
            for p in [root, *sorted(root.rglob("*"))]}


def mount(*args: str) -> str | None:
    """Run `mount ARGS`; None on success, else why not (e.g. no permission)."""
    try:
        res = subprocess.run(["mount", *args], capture_output=True, text=True)
    except OSError as e:
        return str(e)
    return None if res.returncode == 0 else (res.stderr.strip() or f"mount exited {res.returncode}")


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[str | None]:
    target.mkdir(parents=True, exist_ok=True)
    why = mount(*args, str(target))
    try:
        yield why
    finally:
        if why is None:
            subprocess.run(["umount", str(target)], check=False)


def one_line_error(rc: int, stderr: str, *fragments: str) -> tuple[bool, str]:
    lines = stderr.strip().splitlines()
    ok = rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and all(f in lines[0] for f in fragments)
    return ok, lines[-1] if lines else f"(exit {rc}, no stderr)"


def disk_full_cases(model: Path, out: Path, work: Path) -> list[tuple[str, str, str]]:
    """(case, outcome, the error line) for an injected ENOSPC and a real small tmpfs."""
    rows = []
    before = tree(out)
    with full_disk_on_second_chunk():
        rc, err = run_cli("build-index", str(model), str(out), "--quiet")
    ok, line = one_line_error(rc, err, str(out), "no space left on device")
    intact = tree(out) == before and verifies(out) and not beside(out)
    rows.append(("injected ENOSPC on the 2nd chunk written", _outcome(ok, intact, rc), line))

    needed = sum(-(-p.stat().st_size // 4096) * 4096 for p in out.rglob("*") if p.is_file())
    size = -(-(needed + needed // 2) // 4096) * 4096  # the previous index and half of another
    with mounted(work / "tmpfs", "-t", "tmpfs", "-o", f"size={size}", "tmpfs") as why:
        if why is not None:
            rows.append((f"real tmpfs of {size:,} bytes", f"not run: this process may not mount ({why})", ""))
        else:
            small = work / "tmpfs" / out.name
            shutil.copytree(out, small)
            before = tree(small)
            rc, err = run_cli("build-index", str(model), str(small), "--quiet")
            ok, line = one_line_error(rc, err, str(small), "no space left on device")
            intact = tree(small) == before and verifies(small) and not beside(small)
            rows.append((f"real tmpfs of {size:,} bytes holding the previous index ({needed:,} bytes)",
                         _outcome(ok, intact, rc), line))
    return rows


def _outcome(ok: bool, intact: bool, rc: int) -> str:
    return (f"exit {rc}, {'one `error:` line' if ok else 'NOT one error line'}; previous index "
            f"{'intact, verifies' if intact else 'CHANGED or does not verify'}, "
            f"{'nothing left beside it' if intact else 'see the listing'}")


def read_only_cases(out: Path, work: Path, model: Path) -> list[tuple[str, str, str]]:
    """`elias serve`, `Searcher.open`, `elias index verify` and a build on a read-only bind mount of OUT's parent."""
    from grpc_load import spawn_elias_serve, stop_server

    from elias_retrieval.client import SearchClient

    ro = work / "ro"
    ro.mkdir(parents=True, exist_ok=True)
    why = mount("--bind", str(out.parent), str(ro))
    if why is None:
        why = mount("-o", "remount,bind,ro", str(ro))
        if why is not None:
            subprocess.run(["umount", str(ro)], check=False)
    if why is not None:
        return [("read-only bind mount", f"not run: this process may not mount ({why})", "")]
    rows = []
    try:
        idx = ro / out.name
        try:
            (ro / "probe").write_text("x")
            refuses = "NOT read-only: a write succeeded"
        except OSError as e:
            refuses = f"writes fail with {errno.errorcode.get(e.errno or 0, e.errno)}"
        before = tree(idx)
        proc, address = spawn_elias_serve(idx, threads=1, max_message_mb=4)
        try:
            with SearchClient(address, timeout=30) as client:
                info = client.info()
                res = (client.search(text="regulation", k=5) if "text" in info.query_kinds
                       else client.search(embedding=[0.0] * info.dim, k=5))
                served = res.ids.shape == (1, 5)
        finally:
            stop_server(proc)
        rows.append(("`elias serve` on it, one search over gRPC",
                     f"{'served' if served else 'FAILED'} ({refuses})", ""))
        rows.append(("`Searcher.open` and one search in-process", "searched" if loads(idx) else "FAILED", ""))
        rows.append(("`elias index verify`", "passes" if verifies(idx) else "FAILS", ""))
        rows.append(("index tree (names, sizes, mtimes, modes) after the above",
                     "unchanged" if tree(idx) == before else "CHANGED", ""))
        rc, err = run_cli("build-index", str(model), str(idx), "--quiet")
        ok, line = one_line_error(rc, err, str(idx), "read-only file system")
        rows.append(("`elias build-index` into it", f"exit {rc}, "
                     f"{'one `error:` line' if ok else 'NOT one error line'}", line))
    finally:
        subprocess.run(["umount", str(ro)], check=False)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a trained model directory (only read)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--calibrations", type=int, default=2,
                    help="complete builds over an existing index timed before the kills (0: time the first build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help=f"a few kills, for the test suite ({QUICK})")
    ap.add_argument("--benchmarks-file", type=Path, default=BENCHMARKS, help="where the table goes")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parse_args(ap, QUICK)
    machine_desc = machine()
    work = Path(tempfile.mkdtemp(prefix="faults-")) if args.work is None else args.work
    out = work / "out" / "idx"
    try:
        if out.parent.exists():
            shutil.rmtree(out.parent)
        out.parent.mkdir(parents=True)
        timed = [watch_build(args.model, out)[0] for _ in range(1 + args.calibrations)][min(1, args.calibrations):]
        for t in timed:
            print(f"complete build: temporary at {t.tmp_s:.2f} s, swap at {t.swap_s:.2f} s, exit {t.end_s:.2f} s",
                  flush=True)
        cal = Timeline(*(sum(getattr(t, k) for t in timed) / len(timed) for k in ("tmp_s", "swap_s", "end_s")))
        duration = cal.end_s
        rng = random.Random(args.seed)
        kills = []
        for i in range(args.kills):
            at = (i + rng.random()) / args.kills * duration
            ino = out.stat().st_ino
            tl, pid = watch_build(args.model, out, kill_at=at, cal=cal)
            what = phase(out, pid, ino, tl)
            ok_load, ok_verify = loads(out), verifies(out)
            kills.append((at, what, ok_load, ok_verify, len(beside(out))))
            print(f"kill {i + 1:2d} at {at:.2f} s: {what}; loads {ok_load}, verify {ok_verify}, "
                  f"{len(beside(out))} leftovers beside OUT", flush=True)
        left_by_kill = len(beside(out))
        # The next build cleans up; --quick lets the injected-ENOSPC build below be that one (one start fewer).
        final = None if args.quick else watch_build(args.model, out)[0]
        full_rows = disk_full_cases(args.model, out, work)
        left_after = beside(out)
        final_ok = loads(out) and verifies(out)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        ro_rows = read_only_cases(out, work, args.model)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    n = len(kills)
    phases: dict[str, int] = {}
    for _at, what, *_ in kills:
        phases[what] = phases.get(what, 0) + 1
    order = ["before the temporary directory", "mid-write", "manifest written, before the swap",
             "after the swap, deleting the old index", "after the swap and the delete", "finished before the kill"]
    model = args.model.resolve()
    shown = str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(args.model)
    first = "" if args.calibrations else "; the first, into no index"
    t_mean = [sum(getattr(t, k) for t in timed) / len(timed) for k in ("tmp_s", "swap_s", "end_s")]
    lines = [
        f"Model `{shown}`, index written with `elias build-index` (fp16 W_L) over an existing one. "
        f"Machine: {machine_desc}. Date: {today()}. Command: `{command_line()}`.", "",
        f"A complete build ({len(timed)} timed, mean{first}): its temporary directory appears at {t_mean[0]:.2f} s "
        f"(Python start, imports, model load before that), the new index is swapped in at {t_mean[1]:.2f} s, the "
        f"process exits at {t_mean[2]:.2f} s. {n} builds were killed with SIGKILL at seeded random times (seed "
        f"{args.seed}), one in each of {n} equal slices of 0..{duration:.2f} s (the mean build); a time past "
        f"{t_mean[0]:.2f} s counts from the killed build's own temporary directory, scaled by its start-up time over "
        "the mean's (the machine is shared: its load changes a build's speed, and a kill meant for the write should "
        "hit the write).", "",
        "| what the kill hit | kills | `Searcher.open` + a search | `elias index verify` |",
        "| --- | ---: | ---: | ---: |",
    ]
    for what in order:
        rows = [k for k in kills if k[1] == what]
        if rows:
            lines.append(f"| {what} | {len(rows)} | {sum(k[2] for k in rows)}/{len(rows)} | "
                         f"{sum(k[3] for k in rows)}/{len(rows)} |")
    mid = phases.get("mid-write", 0) + phases.get("manifest written, before the swap", 0)
    lines += [
        f"| all | {n} | {sum(k[2] for k in kills)}/{n} | {sum(k[3] for k in kills)}/{n} |", "",
        f"Kills that hit mid-write (temporary directory present, not yet swapped): {mid} of {n}. Leftovers of a "
        f"killed build stay until the next build of the same OUT removes them (only a dead PID's); after the last "
        f"kill ({left_by_kill} entries beside OUT) the next build "
        f"({'the injected-ENOSPC one below' if final is None else f'a complete one, {final.end_s:.2f} s'}) "
        f"left {len(left_after)} entries beside OUT, and the index "
        f"{'loads and verifies' if final_ok else 'FAILS to load or verify'} ({size:,} bytes).", "",
        "| fault | outcome | error line |",
        "| --- | --- | --- |",
        *(f"| full disk: {case} | {outcome} | {('`' + line + '`') if line else ''} |"
          for case, outcome, line in full_rows),
        *(f"| read-only bind mount: {case} | {outcome} | {('`' + line + '`') if line else ''} |"
          for case, outcome, line in ro_rows),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(SECTION, text, args.benchmarks_file)
        print(f"wrote {SECTION!r} in {args.benchmarks_file}")


if __name__ == "__main__":
    main()
