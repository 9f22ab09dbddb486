"""The normalised metadata schema every source is ingested into, and the stable sample id."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

# Our column -> (DuckDB type, pyarrow type). Order is the on-disk order.
COLUMNS: dict[str, tuple[str, pa.DataType]] = {
    "uid": ("VARCHAR", pa.string()),
    "source": ("VARCHAR", pa.string()),
    "url": ("VARCHAR", pa.string()),
    "caption": ("VARCHAR", pa.string()),
    "similarity": ("DOUBLE", pa.float64()),
    "width": ("BIGINT", pa.int64()),
    "height": ("BIGINT", pa.int64()),
    "punsafe": ("DOUBLE", pa.float64()),
    "pwatermark": ("DOUBLE", pa.float64()),
    "language": ("VARCHAR", pa.string()),
    "extra": ("VARCHAR", pa.string()),
}
SCHEMA = pa.schema([(name, arrow) for name, (_, arrow) in COLUMNS.items()])
NUMERIC = ("similarity", "width", "height", "punsafe", "pwatermark")
UID_HEX = 16
CAPTION_MAX_CHARS = 1000  # the default cap of a caption's length (curate.caption_max_chars)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")  # C0 and C1 control characters, tabs and newlines included


def make_uid(source: str, url: str) -> str:
    """Stable id of a sample: the first 16 hex digits of sha256("<source> <url>") (source names have no spaces)."""
    return hashlib.sha256(f"{source} {url}".encode()).hexdigest()[:UID_HEX]


def uid_sql(source_sql: str, url_sql: str) -> str:
    """The same id as make_uid, as a DuckDB expression."""
    return f"sha256({source_sql} || ' ' || {url_sql})[:{UID_HEX}]"


def clean_caption(text: str, max_chars: int = CAPTION_MAX_CHARS) -> str:
    """A caption with every run of control characters (NUL, newlines, C1) made one space, trimmed, and cut to
    `max_chars` characters."""
    return _CONTROL.sub(" ", text).strip()[:max_chars].strip()
