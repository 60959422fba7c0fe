"""`python -m elias_retrieval` is the `elias` command."""

from elias_retrieval.cli import main

main()
