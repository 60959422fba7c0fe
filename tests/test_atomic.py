"""atomic.atomic_dir under faults: the exchange, kills between its steps (real SIGKILLs of a forked writer),
leftovers of dead writers cleaned but never a live writer's, a full disk (`elias build-index`: one error line,
nothing left), and an index that loads and serves without a write into its directory."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_index_builder import tiny_model_dir
from typer.testing import CliRunner

from elias_retrieval import atomic
from elias_retrieval import index_format as fmt
from elias_retrieval.atomic import atomic_dir, clean_leftovers, exchange, leftover_previous
from elias_retrieval.cli import app
from elias_retrieval.cli import index as _register_index_verbs  # noqa: F401
from elias_retrieval.client import SearchClient
from elias_retrieval.index_format import IndexFormatError, read_index
from elias_retrieval.searcher import Searcher
from elias_retrieval.server import ServerConfig, start_server
from index_builder.build import build_index


def write_version(path: Path, version: str, body: Callable[[Path], None] | None = None) -> None:
    """Replace directory `path` with one holding `a` and `sub/b`, both reading `version`."""
    with atomic_dir(path) as tmp:
        (tmp / "a").write_text(version)
        if body is not None:
            body(tmp)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text(version)


def version_of(path: Path) -> str:
    a, b = (path / "a").read_text(), (path / "sub" / "b").read_text()
    assert a == b, f"{path} is a mix of two versions"
    return a


def beside(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def killed_in_child(path: Path, version: str, patch: Callable[[], None]) -> int:
    """Fork a writer of `version` into `path` that `patch` arranges to SIGKILL itself at some step; its PID."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            patch()
            write_version(path, version)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"
    return pid


def die(*_args: object, **_kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---- the exchange --------------------------------------------------------------------------------------------


def test_exchange_swaps_two_directories_in_one_step(tmp_path: Path):
    assert atomic._renameat2() is not None, "this Linux's glibc has renameat2 (>= 2.28): the exchange must be used"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("y")
    assert exchange(tmp_path / "x", tmp_path / "y")
    assert (tmp_path / "x" / "f").read_text() == "y" and (tmp_path / "y" / "f").read_text() == "x"


def test_replacing_a_directory_exchanges_it_and_deletes_the_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "parent" / "idx"
    write_version(out, "1")
    calls = []
    real = atomic.exchange

    def spy(a: Path, b: Path) -> bool:
        calls.append((Path(a).name, Path(b).name))
        return real(a, b)

    monkeypatch.setattr(atomic, "exchange", spy)
    write_version(out, "2")
    assert len(calls) == 1 and calls[0][1] == "idx" and calls[0][0].startswith(f".idx.{os.getpid()}-")
    assert version_of(out) == "2"
    assert beside(out) == ["idx"]  # the old one (at the temporary's name after the swap) is gone


def test_without_the_exchange_the_fallback_renames_replace_the_directory(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "idx"
    write_version(out, "1")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    write_version(out, "2")
    assert version_of(out) == "2" and beside(out) == ["idx"]


# ---- SIGKILL at each step ------------------------------------------------------------------------------------


def test_killed_mid_write_leaves_the_previous_and_the_next_writer_cleans_up(tmp_path: Path):
    out = tmp_path / "idx"
    write_version(out, "1")

    def patch() -> None:
        atomic.fsync_dir = die  # type: ignore[assignment]  # the first fsync: files written, not all synced

    pid = killed_in_child(out, "2", patch)
    assert version_of(out) == "1"
    left = [n for n in beside(out) if n != "idx"]
    assert len(left) == 1 and left[0].startswith(f".idx.{pid}-") and left[0].endswith(".tmp")
    write_version(out, "3")
    assert version_of(out) == "3" and beside(out) == ["idx"]


def test_killed_with_the_new_directory_complete_before_the_swap(tmp_path: Path):
    out = tmp_path / "idx"
    write_version(out, "1")

    def patch() -> None:
        atomic._swap_in = die  # type: ignore[assignment]

    pid = killed_in_child(out, "2", patch)
    assert version_of(out) == "1"
    (left,) = [tmp_path / n for n in beside(out) if n != "idx"]
    assert left.name.startswith(f".idx.{pid}-") and version_of(left) == "2"  # complete, never swapped in
    assert clean_leftovers(out) == [left] and beside(out) == ["idx"]


def test_killed_after_the_swap_before_deleting_the_old(tmp_path: Path):
    out = tmp_path / "idx"
    write_version(out, "1")

    def patch() -> None:
        atomic._remove = die  # type: ignore[assignment]

    pid = killed_in_child(out, "2", patch)
    assert version_of(out) == "2"
    (left,) = [tmp_path / n for n in beside(out) if n != "idx"]
    assert left.name.startswith(f".idx.{pid}-") and version_of(left) == "1"  # the old one, at the temp's name
    write_version(out, "3")
    assert version_of(out) == "3" and beside(out) == ["idx"]


def test_killed_between_the_fallback_renames_the_next_writer_puts_the_previous_back(tmp_path: Path):
    out = tmp_path / "idx"
    write_version(out, "1")

    def patch() -> None:
        atomic.exchange = lambda a, b: False  # type: ignore[assignment]
        real, n = os.replace, [0]

        def replace(src: object, dst: object) -> None:
            n[0] += 1
            if n[0] == 2:  # the first moved the previous aside; the kill comes before the new one goes in
                die()
            real(src, dst)  # type: ignore[arg-type]

        os.replace = replace  # type: ignore[assignment]

    pid = killed_in_child(out, "2", patch)
    assert not out.exists()
    old = tmp_path / f".idx.old-{pid}"
    assert leftover_previous(out) == old and version_of(old) == "1"
    with pytest.raises(IndexFormatError, match=rf"no such index directory; .*previous index at {old}"):
        read_index(out)  # a reader says where it is, and renames nothing
    assert old.is_dir()
    write_version(out, "3")
    assert version_of(out) == "3" and beside(out) == ["idx"]


def test_an_error_in_the_fallback_renames_puts_the_previous_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "idx"
    write_version(out, "1")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real, n = os.replace, [0]

    def replace(src: object, dst: object) -> None:
        n[0] += 1
        if n[0] == 2:
            raise OSError(errno.EIO, "injected")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        write_version(out, "2")
    assert version_of(out) == "1" and beside(out) == ["idx"]


@pytest.mark.parametrize("step", ["body", "_swap_in"])
def test_an_exception_before_the_swap_leaves_the_previous_and_nothing_else(tmp_path: Path, step: str,
                                                                           monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "idx"
    write_version(out, "1")

    def boom(*_args: object) -> None:
        raise RuntimeError("injected")

    if step == "_swap_in":
        monkeypatch.setattr(atomic, "_swap_in", boom)
    with pytest.raises(RuntimeError, match="injected"):
        write_version(out, "2", body=boom if step == "body" else None)
    assert version_of(out) == "1" and beside(out) == ["idx"]


# ---- leftovers: only dead writers' -------------------------------------------------------------------------


def test_cleaning_removes_dead_writers_leftovers_only(tmp_path: Path):
    out = tmp_path / "idx"
    write_version(out, "1")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, locked_owner = dead_pid(), dead_pid()
        names = {
            "dead_tmp": f".idx.{dead}-abc123_x.tmp", "dead_old": f".idx.old-{dead}",
            "live_tmp": f".idx.{live.pid}-abc123_x.tmp", "live_old": f".idx.old-{live.pid}",
            "locked_tmp": f".idx.{locked_owner}-zzz.tmp",  # a writer in another PID namespace holds it locked
            "no_pid": ".idx.abc123_x.tmp", "other_dir": f".idx2.{dead}-abc.tmp",
        }
        for n in names.values():
            (tmp_path / n).mkdir()
        fd = os.open(tmp_path / names["locked_tmp"], os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            gone = clean_leftovers(out)
        finally:
            os.close(fd)
        assert sorted(p.name for p in gone) == sorted([names["dead_tmp"], names["dead_old"]])
        kept = set(names.values()) - {names["dead_tmp"], names["dead_old"]}
        assert set(beside(out)) == kept | {"idx"}
    finally:
        live.kill()
        live.wait()


def test_a_concurrent_writer_does_not_remove_the_other_writers_temporary(tmp_path: Path):
    out = tmp_path / "idx"
    write_version(out, "1")

    def meanwhile(tmp: Path) -> None:
        write_version(out, "2")  # a second writer of the same directory runs to completion in between
        assert tmp.is_dir() and (tmp / "a").read_text() == "3"

    write_version(out, "3", body=meanwhile)
    assert version_of(out) == "3" and beside(out) == ["idx"]


# ---- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "m")


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (and root itself) -> (size, mtime_ns, mode)."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_mode)
    return out


def test_a_staged_directory_is_in_place_only_once_committed_and_a_later_stage_keeps_a_pending_one(tmp_path: Path):
    path = tmp_path / "state"
    write_version(path, "v1")
    with atomic.staged_dir(path) as first:
        (first.tmp / "a").write_text("v2")
        (first.tmp / "sub").mkdir()
        (first.tmp / "sub" / "b").write_text("v2")
    assert version_of(path) == "v1"  # written, not yet in place
    with atomic.staged_dir(path) as second:  # staging again cleans leftovers, never a live one's pending version
        (second.tmp / "a").write_text("v3")
    assert first.tmp.is_dir()
    first.commit()
    assert version_of(path) == "v2" and not first.tmp.exists()
    second.discard()
    assert version_of(path) == "v2" and beside(path) == ["state"]


def test_a_failed_staging_leaves_the_previous_and_nothing_else(tmp_path: Path):
    path = tmp_path / "state"
    write_version(path, "v1")
    with pytest.raises(RuntimeError), atomic.staged_dir(path) as staged:
        (staged.tmp / "a").write_text("v2")
        raise RuntimeError("the writer failed")
    assert version_of(path) == "v1" and beside(path) == ["state"]


def test_build_index_on_a_full_disk_is_one_error_line_and_leaves_nothing(model_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "indexes" / "idx"
    build_index(model_dir, out, progress=False)
    before = snapshot(out)
    real = fmt._write_hashed
    written = []

    def full_disk(path: Path, chunks: Iterator[bytes], advance: Callable[[int], None]) -> dict[str, object]:
        if written:  # the first file goes through; the disk fills up on the second
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(path)
        return real(path, chunks, advance)

    monkeypatch.setattr(fmt, "_write_hashed", full_disk)
    res = CliRunner().invoke(app, ["build-index", str(model_dir), str(out), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: no space left on device"), res.output
    assert written and written[0].parent.name.startswith(".idx.")  # it did start writing the new one
    assert beside(out) == ["idx"] and snapshot(out) == before
    fmt.verify_index(out)


def test_build_into_a_read_only_place_is_one_error_line(model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "ro" / "idx"

    def read_only(*_args: object, **_kwargs: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out.parent / ".idx.1-x.tmp"))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    res = CliRunner().invoke(app, ["build-index", str(model_dir), str(out), "--quiet"])
    assert res.exit_code == 2 and res.output.startswith(f"error: {out}: read-only file system"), res.output


# ---- loading and serving write nothing -------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "os.truncate",
            "os.link", "os.symlink", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
_watch: dict[str, object] = {"root": None, "seen": []}


def _audit(event: str, args: tuple) -> None:
    root = _watch["root"]
    if root is not None and _writes(event, args, str(root)):
        _watch["seen"].append((event, args))  # type: ignore[attr-defined]


def _writes(event: str, args: tuple, root: str) -> bool:
    """Whether an audit event could change something under `root` (an open for writing, a rename, a writable
    file mapping, ...)."""
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        writes = any(c in str(mode) for c in "wax+") if mode is not None else bool(int(flags or 0) & _WRITE_FLAGS)
        return writes and os.path.abspath(os.fsdecode(args[0])).startswith(root)
    if event == "mmap.__new__":
        return args[0] != -1 and args[2] not in (mmap.ACCESS_READ, mmap.ACCESS_COPY)
    return event in _CHANGES and any(str(a).startswith(root) for a in args if isinstance(a, (str, os.PathLike)))


sys.addaudithook(_audit)


def test_loading_searching_and_serving_an_index_write_nothing_into_it(model_dir: Path, tmp_path: Path):
    out = build_index(model_dir, tmp_path / "idx", progress=False)
    before = snapshot(out)
    _watch.update(root=out.resolve(), seen=[])
    try:
        searcher = Searcher.open(out, device="cpu")
        assert searcher.search_texts(["wine market"], k=5).ids.shape == (1, 5)
        server = start_server(Searcher.open(out, device="cpu"), ServerConfig(host="127.0.0.1", port=0))
        try:
            with SearchClient(server.address, timeout=10) as client:
                assert client.search(text="fishing quotas", k=3).ids.shape == (1, 3)
        finally:
            server.stop(0)
        fmt.verify_index(out)
    finally:
        _watch["root"] = None
    assert _watch["seen"] == []
    assert snapshot(out) == before
    _watch.update(root=out.resolve(), seen=[])  # the probe itself sees a write
    try:
        (out / "probe").write_text("x")
    finally:
        _watch["root"] = None
    assert _watch["seen"]
