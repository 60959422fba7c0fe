"""The `elias` command line: thin verbs over the library (one module per group of verbs)."""

from __future__ import annotations

from elias_retrieval.cli.app import app


def main() -> None:
    # Importing the verb modules registers their commands on `app`.
    from elias_retrieval.cli import index, serve, train  # noqa: F401

    app()


__all__ = ["app", "main"]
