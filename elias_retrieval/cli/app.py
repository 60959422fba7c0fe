"""The typer app and the one place where expected errors become a one-line message and exit code 2."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

app = typer.Typer(
    name="elias",
    help="ELIAS learned-index retrieval: train, build indexes, search, serve and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Errors a user can cause with bad input: reported in one line, never as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 PermissionError, IsADirectoryError, KeyError)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn expected errors into `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)
        except USER_ERRORS as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            fail(msg or type(e).__name__)
        except OSError as e:  # a full disk or quota, a read-only filesystem: the user's to fix, not a bug
            if e.errno not in DISK_ERRNOS:
                raise
            why = e.strerror or os.strerror(e.errno)
            fail(f"{e.filename}: {why[:1].lower()}{why[1:]}" if e.filename else why)

    return wrapper  # type: ignore[return-value]
