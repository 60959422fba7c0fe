"""`elias serve` and `elias search` (owned by the searcher work)."""
