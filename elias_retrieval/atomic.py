"""Atomic writes: a file or directory is either absent, the old version, or complete (temp, fsync, rename)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
            fsync_dir(path.parent)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success replace `path` with it.

    Every file in it is fsynced, then the complete directory takes `path`'s place: on Linux by one atomic
    exchange (renameat2 RENAME_EXCHANGE), after which the previous directory is deleted; elsewhere by
    renaming the previous one aside (`.NAME.old-PID`) and the new one in. A process killed at any point
    leaves `path` as it was or complete; after a kill between the two fallback renames `path` is missing
    and the next `atomic_dir(path)` renames the previous one back. Leftovers of killed writers of `path`
    (`.NAME.PID-*.tmp`, `.NAME.old-PID`) are removed at the start, only those whose PID is dead and that no
    process holds locked. Out of space (ENOSPC, EDQUOT) or on a read-only filesystem the OSError names
    `path`, and nothing is left behind.
    """
    with staged_dir(path) as staged:
        yield staged.tmp
    staged.commit()


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[StagedDir]:
    """A `StagedDir` of `path` to write into: discarded if the writing fails, else left for its `commit`. Out of
    space or on a read-only filesystem the OSError names `path`."""
    path = Path(path)
    with _naming(path):
        staged = StagedDir(path)
        try:
            yield staged
        except BaseException:
            staged.discard()
            raise


class StagedDir:
    """A new version of the directory `path`, written beside it now and put in place later: `commit` does the
    rest of `atomic_dir` (fsync every file, then the swap), on any thread, once the writing is done, so a caller can
    write from data it goes on changing afterwards and leave the waits on the disk to another thread. Until then
    `path` is unchanged; `discard` removes the new version instead (a killed process's is removed as a leftover).
    """

    def __init__(self, path: str | Path) -> None:  # through `staged_dir`, which names `path` in disk errors
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.path)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{os.getpid()}-", suffix=".tmp",
                                         dir=self.path.parent))
        self._lock: int | None = os.open(self.tmp, os.O_RDONLY)
        with contextlib.suppress(OSError):  # marks it in use for writers in other PID namespaces (advisory)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def commit(self) -> None:
        """fsync the new version and put it at `path` (the previous version is deleted)."""
        try:
            with _naming(self.path):
                for root, _dirs, files in os.walk(self.tmp):
                    for name in files:
                        with open(os.path.join(root, name), "rb") as f:
                            os.fsync(f.fileno())
                    fsync_dir(root)
                old = _swap_in(self.tmp, self.path)
                if old is not None:
                    _remove(old)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the new version, if it was not committed, and release it."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.tmp.exists():
            _remove(self.tmp)


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise running out of space (or a read-only filesystem) as an OSError naming the destination."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise OSError(e.errno, f"{os.strerror(e.errno).lower()}; nothing was written there, any previous "
                      "version is unchanged", str(path)) from e


def _swap_in(tmp: Path, path: Path) -> Path | None:
    """Put the complete directory `tmp` at `path`; return where the previous `path` now is (to delete), if any."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        fsync_dir(path.parent)
        return None
    if exchange(tmp, path):
        fsync_dir(path.parent)
        return tmp
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)  # a kill just before this leaves `path` missing: recover_dir puts `old` back
    except BaseException:
        os.replace(old, path)
        raise
    fsync_dir(path.parent)
    return old


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (glibc >= 2.28) through ctypes; None elsewhere (another OS or C library, older glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the paths `a` and `b` (both must exist) in one atomic step; False where the system or filesystem
    cannot (then nothing was changed)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no renameat2 in the kernel, or not on this fs
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path) -> list[tuple[Path, str]]:
    """(leftover, kind) beside `path` whose writer is dead: kind "tmp" (`.NAME.PID-*.tmp`) or "old"
    (`.NAME.old-PID`). A leftover whose directory some process holds locked is kept (a live writer in another
    PID namespace); entries without a PID in their name (older writers) are left alone."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-[a-z0-9_]+\.tmp|old-(\d+))")
    found: list[tuple[Path, str]] = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return found
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1) or m.group(2))):
            continue
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False) and _locked(p):
            continue
        found.append((p, "tmp" if m.group(1) else "old"))
    return found


def _locked(d: Path) -> bool:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def leftover_previous(path: str | Path) -> Path | None:
    """The previous directory a killed fallback replace left beside a missing `path` (`.NAME.old-PID`), if any."""
    path = Path(path)
    if os.path.lexists(path):
        return None
    olds = [p for p, kind in _leftovers(path) if kind == "old" and p.is_dir()]
    return max(olds, key=lambda p: p.stat().st_ctime_ns, default=None)


def recover_dir(path: str | Path) -> Path | None:
    """Rename the previous directory back to a missing `path` after a kill between the two fallback renames.

    Returns the directory renamed back, or None when there was nothing to do (or another process did it).
    """
    path = Path(path)
    old = leftover_previous(path)
    if old is None:
        return None
    try:
        os.rename(old, path)  # fails if `path` appeared meanwhile (a non-empty directory): then keep that one
    except OSError:
        return None
    fsync_dir(path.parent)
    return path


def clean_leftovers(path: str | Path) -> list[Path]:
    """Delete what killed writers of `path` left beside it (their PID dead); return what was deleted.

    Never touches the temporary of a live writer, in this PID namespace (its PID runs) or another (it holds
    its directory locked). A missing `path` with a previous version aside is first put back (`recover_dir`).
    """
    path = Path(path)
    recover_dir(path)
    gone = [p for p, _kind in _leftovers(path)]
    for p in gone:
        _remove(p)
    return gone
