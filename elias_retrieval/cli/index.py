"""`elias build-index` and `elias index info|verify` (owned by the index format work)."""
