"""The storage layer's refusals of a file a user gave or a store that does not fit (importable without duckdb)."""

from __future__ import annotations


class StoreInputError(ValueError):
    """A metadata, instruction or index file that cannot be used; the message names it and says why."""
