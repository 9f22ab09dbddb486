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
# What str.isspace() holds besides the control characters: trimmed from both ends of a caption.
SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def make_uid(source: str, url: str) -> str:
    """Stable id of a sample: the first 16 hex digits of sha256("<source> <url>") (source names have no spaces)."""
    return hashlib.sha256(f"{source} {url}".encode()).hexdigest()[:UID_HEX]


def uid_sql(source_sql: str, url_sql: str) -> str:
    """The same id as make_uid, as a DuckDB expression."""
    return f"sha256({source_sql} || ' ' || {url_sql})[:{UID_HEX}]"


def clean_caption(text: str, max_chars: int = CAPTION_MAX_CHARS) -> str:
    """A caption with every run of control characters (NUL, newlines, C1) made one space, trimmed, and cut to
    `max_chars` characters."""
    return _CONTROL.sub(" ", text).strip(SPACES)[:max_chars].strip(SPACES)


def clean_caption_sql(expr: str, max_chars: int = CAPTION_MAX_CHARS) -> str:
    """clean_caption as a DuckDB expression over the VARCHAR expression `expr` (NULL stays NULL).

    Lengths count code points in both, as Python's slices and DuckDB's `left` do.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars <= 0:
        raise ValueError(f"max_chars must be a positive integer, not {max_chars!r}")
    spaces = f"'{SPACES}'"
    spaced = f"trim(regexp_replace({expr}, '{_CONTROL.pattern}', ' ', 'g'), {spaces})"
    return f"trim(left({spaced}, {max_chars}), {spaces})"
