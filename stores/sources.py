"""Source metadata formats: one DuckDB adapter per format that reads a file and yields the normalised columns."""

from __future__ import annotations

import glob
import os
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import fsspec
from fsspec.implementations.local import LocalFileSystem

from stores.errors import StoreInputError
from stores.metadata import CAPTION_MAX_CHARS, COLUMNS, NUMERIC, clean_caption_sql, uid_sql

# Candidate column names per format (matched case-insensitively, first hit wins).
LAION = {
    "url": ("url",),
    "caption": ("text", "caption"),
    "similarity": ("similarity",),
    "width": ("width",),
    "height": ("height",),
    "punsafe": ("punsafe",),
    "pwatermark": ("pwatermark",),
    "language": ("language", "lang"),
}
COYO = {
    "url": ("url",),
    "caption": ("text",),
    "similarity": ("clip_similarity_vitl14", "clip_similarity_vitb32"),
    "width": ("width",),
    "height": ("height",),
    "punsafe": ("nsfw_score_opennsfw2", "nsfw_score_gantman"),
    "pwatermark": ("watermark_score",),
}
REQUIRED = ("url", "caption")
FINITE_TYPES = ("DOUBLE", "BIGINT")  # numeric columns: NaN and infinities become NULL

# Nested formats: SQL over one file ($path) that yields our column names directly.
MMC4_SQL = """
SELECT im.raw_url AS url, doc.text_list[im.matched_text_index + 1] AS caption, im.matched_sim AS similarity,
       to_json({'document': doc.url, 'image_name': im.image_name}) AS extra
FROM (SELECT url, text_list, unnest(image_info) AS im
      FROM read_json($path, format = 'newline_delimited', columns = {
          'url': 'VARCHAR', 'text_list': 'VARCHAR[]',
          'image_info': 'STRUCT(image_name VARCHAR, raw_url VARCHAR, matched_text_index BIGINT, matched_sim DOUBLE)[]'
      })) AS doc
"""
# COCO and SBU files are one JSON document each (hundreds of MB): DuckDB must be told the size ({max_object}).
COCO_SQL = """
WITH doc AS (SELECT images, annotations FROM read_json($path, maximum_object_size = {max_object})),
     img AS (SELECT unnest(images, recursive := true) FROM doc),
     ann AS (SELECT unnest(annotations, recursive := true) FROM doc)
SELECT img.coco_url AS url, ann.caption AS caption, img.width AS width, img.height AS height,
       to_json({'image_id': img.id, 'annotation_id': ann.id}) AS extra
FROM ann JOIN img ON ann.image_id = img.id
"""
SBU_SQL = """
SELECT unnest(image_urls) AS url, unnest(captions) AS caption
FROM read_json($path, maximum_object_size = {max_object})
"""


class SourceFileError(StoreInputError):
    """A metadata file that cannot be ingested; the message names the file, the column and the value."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _reader_sql(path: str, kind: str | None = None) -> str:
    """A DuckDB table function reading `path` (bound as $path) by its extension, or as a headerless tsv `kind`."""
    if kind == "cc3m":
        return "read_csv($path, delim = '\t', header = false, quote = '', escape = '', columns = {'caption': 'VARCHAR', 'url': 'VARCHAR'})"  # noqa: E501
    if kind == "cc12m":
        return "read_csv($path, delim = '\t', header = false, quote = '', escape = '', columns = {'url': 'VARCHAR', 'caption': 'VARCHAR'})"  # noqa: E501
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "read_parquet($path)"
    if name.endswith(".tsv"):
        return "read_csv($path, delim = '\t', header = true)"
    if name.endswith(".csv"):
        return "read_csv($path, header = true)"
    if name.endswith((".jsonl", ".json")):
        return "read_json($path, format = 'newline_delimited')"
    raise SourceFileError(f"{path}: unknown file type; expected .parquet, .csv, .tsv, .jsonl or .json (optionally .gz)")


@dataclass(frozen=True)
class Adapter:
    """How one format's file becomes normalised rows.

    Attributes:
        name: the format name of the config.
        candidates: our column -> their candidate names, for flat formats.
        nested_sql: for nested formats, SQL over $path that yields our column names.
        headerless: 'cc3m' / 'cc12m' for their headerless tsv files.
    """

    name: str
    candidates: Mapping[str, Sequence[str]] = field(default_factory=dict)
    nested_sql: str | None = None
    headerless: str | None = None

    def inner_sql(self, path: str) -> str:
        """SQL of the raw rows of one file."""
        if self.nested_sql is not None:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            return self.nested_sql.replace("{max_object}", str(min(max(size + (1 << 20), 16 << 20), (1 << 32) - 1)))
        return f"SELECT * FROM {_reader_sql(path, self.headerless)}"

    def mapping(self, path: str, available: Sequence[str]) -> dict[str, str | None]:
        """Our column -> the file's column (None when the file has none); missing required columns are errors."""
        lower = {c.lower(): c for c in available}
        if self.nested_sql is not None:
            return {ours: (ours if ours in available else None) for ours in COLUMNS if ours not in ("uid", "source")}
        out: dict[str, str | None] = {}
        for ours, names in self.candidates.items():
            out[ours] = next((lower[n.lower()] for n in names if n.lower() in lower), None)
        for ours in REQUIRED:
            if out.get(ours) is None:
                looked = ", ".join(self.candidates.get(ours, ()))
                raise SourceFileError(
                    f"{path}: no column for {ours!r} (looked for: {looked}; the file has: {', '.join(available)})"
                )
        return out


def adapter_for(fmt: str, columns: Mapping[str, str] | None = None) -> Adapter:
    """The adapter of a config format; `generic` takes the column mapping `columns` (ours -> theirs)."""
    if fmt in ("laion", "synthetic"):
        return Adapter(fmt, LAION)
    if fmt == "coyo":
        return Adapter(fmt, COYO)
    if fmt in ("cc3m", "cc12m"):
        return Adapter(fmt, {"url": ("url",), "caption": ("caption",)}, headerless=fmt)
    if fmt == "mmc4":
        return Adapter(fmt, nested_sql=MMC4_SQL)
    if fmt == "coco":
        return Adapter(fmt, nested_sql=COCO_SQL)
    if fmt == "sbu":
        return Adapter(fmt, nested_sql=SBU_SQL)
    if fmt == "generic":
        cols = dict(columns or {})
        unknown = sorted(set(cols) - set(COLUMNS) - {"uid", "source"})
        if unknown:
            raise SourceFileError(f"generic columns: unknown target column(s) {unknown}; ours are {list(COLUMNS)}")
        cands = {ours: (cols.get(ours, ours),) for ours in COLUMNS if ours not in ("uid", "source", "extra")}
        return Adapter(fmt, cands)
    raise SourceFileError(f"unknown source format {fmt!r}")


def describe(con: duckdb.DuckDBPyConnection, adapter: Adapter, path: str) -> dict[str, str]:
    """Column name -> DuckDB type of a file's raw rows; unreadable files raise SourceFileError."""
    try:
        rows = con.execute(f"DESCRIBE {adapter.inner_sql(path)}", {"path": path}).fetchall()
    except duckdb.Error as e:
        raise SourceFileError(f"{path}: cannot be read as {adapter.name}: {_first_line(e)}") from None
    return {r[0]: r[1] for r in rows}


def validate(con: duckdb.DuckDBPyConnection, adapter: Adapter, path: str) -> tuple[dict[str, str | None], int]:
    """Check one file before anything is written: columns, value types, not empty. Returns (mapping, rows)."""
    types = describe(con, adapter, path)
    mapping = adapter.mapping(path, list(types))
    checks = ["count(*)"]
    checked: list[tuple[str, str]] = []
    for ours, theirs in mapping.items():
        if theirs is None:
            continue
        if ours in NUMERIC and not _is_numeric(types[theirs]):
            cast = f"TRY_CAST({_q(theirs)} AS DOUBLE)"
            bad = f"{_q(theirs)} IS NOT NULL AND {cast} IS NULL"
            checks.append(f"any_value({_q(theirs)}::VARCHAR) FILTER (WHERE {bad})")
            checked.append((ours, theirs))
        if ours in ("url", "caption") and _is_numeric(types[theirs]):
            raise SourceFileError(f"{path}: column {theirs!r} ({ours}) holds numbers ({types[theirs]}), not text")
    try:
        row = con.execute(f"SELECT {', '.join(checks)} FROM ({adapter.inner_sql(path)})", {"path": path}).fetchone()
    except duckdb.Error as e:
        raise SourceFileError(f"{path}: cannot be read as {adapter.name}: {_first_line(e)}") from None
    assert row is not None
    if row[0] == 0:
        raise SourceFileError(f"{path}: the file has no rows")
    for (ours, theirs), bad in zip(checked, row[1:], strict=True):
        if bad is not None:
            raise SourceFileError(f"{path}: column {theirs!r} ({ours}) has a non-numeric value {bad!r}")
    return mapping, int(row[0])


def normalised_sql(
    adapter: Adapter,
    path: str,
    mapping: Mapping[str, str | None],
    available: Sequence[str],
    caption_max_chars: int = CAPTION_MAX_CHARS,
) -> str:
    """SELECT of the normalised columns (binds $path and $source); unmapped columns go into `extra` as JSON.

    Captions are cleaned as `clean_caption` does: control characters made spaces, trimmed, cut to
    `caption_max_chars`.
    """
    parts = [f"{uid_sql('$source', 'trim(src.' + _q(mapping['url'] or 'url') + ')')} AS uid", "$source AS source"]
    for ours, (dtype, _) in COLUMNS.items():
        if ours in ("uid", "source", "extra"):
            continue
        theirs = mapping.get(ours)
        if theirs is None:
            parts.append(f"NULL::{dtype} AS {ours}")
        elif ours == "url":
            parts.append(f"trim(src.{_q(theirs)}) AS url")
        elif ours == "caption":
            parts.append(f"{clean_caption_sql(f'TRY_CAST(src.{_q(theirs)} AS VARCHAR)', caption_max_chars)} AS caption")
        elif dtype in FINITE_TYPES:
            parts.append(f"{finite_sql('src.' + _q(theirs), dtype)} AS {ours}")
        else:
            parts.append(f"TRY_CAST(src.{_q(theirs)} AS {dtype}) AS {ours}")
    parts.append(f"{_extra_sql(adapter, mapping, available)} AS extra")
    return f"SELECT {', '.join(parts)} FROM ({adapter.inner_sql(path)}) AS src"


def finite_sql(column: str, dtype: str) -> str:
    """`column` cast to `dtype`, NULL where it is NaN or infinite.

    DuckDB orders NaN above every number: a NaN score would pass every threshold and win every ranking, where a
    NULL is unknown to every filter.
    """
    return f"TRY_CAST(CASE WHEN isfinite(TRY_CAST({column} AS DOUBLE)) THEN {column} END AS {dtype})"


def _extra_sql(adapter: Adapter, mapping: Mapping[str, str | None], available: Sequence[str]) -> str:
    if adapter.nested_sql is not None:
        return "src.extra" if "extra" in available else "NULL::VARCHAR"
    used = {v for v in mapping.values() if v is not None}
    rest = [c for c in available if c not in used]
    if not rest:
        return "NULL::VARCHAR"
    return "to_json(struct_pack(" + ", ".join(f"{_q(c)} := src.{_q(c)}" for c in rest) + "))::VARCHAR"


def _is_numeric(dtype: str) -> bool:
    return dtype.upper().split("(")[0] in {
        "TINYINT",
        "SMALLINT",
        "INTEGER",
        "BIGINT",
        "HUGEINT",
        "UTINYINT",
        "USMALLINT",
        "UINTEGER",
        "UBIGINT",
        "FLOAT",
        "DOUBLE",
        "DECIMAL",
        "REAL",
    }


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def connect(memory_limit: str = "1GB", threads: int | None = None, temp_dir: str | None = None) -> Any:
    """A DuckDB connection with bounded memory (spilling to `temp_dir`)."""
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute("SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if temp_dir:
        con.execute("SET temp_directory = $d", {"d": temp_dir})
    return con


def _fs(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(url, **dict(options or {}))


def expand_inputs(patterns: Sequence[str], options: Callable[[str], Mapping[str, Any]] | None = None) -> list[str]:
    """Every file matching the patterns (local paths or fsspec URLs, globs allowed), sorted, as URLs; `options` gives
    a URL's fsspec options (`Workspace.options_for`)."""
    out: list[str] = []
    for pattern in patterns:
        fs, path = _fs(pattern, options(pattern) if options else None)
        matches = sorted(fs.glob(path)) if glob.has_magic(path) else ([path] if fs.exists(path) else [])
        if not matches:
            raise SourceFileError(
                f"{pattern}: no such file" + (" (the pattern matched nothing)" if glob.has_magic(path) else "")
            )
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        out.extend(m if proto in ("file", "local") else f"{proto}://{m}" for m in matches)
    return out


def localise(url: str, scratch: str, options: Mapping[str, Any] | None = None) -> str:
    """A local path DuckDB can read for `url`: remote files are copied into `scratch`, zip archives extracted."""
    fs, path = _fs(url, options)
    local = path
    if not isinstance(fs, LocalFileSystem):
        local = os.path.join(scratch, os.path.basename(path))
        fs.get_file(path, local)
    if local.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(local) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise SourceFileError(f"{url}: expected one file in the zip archive, found {len(members)}")
                target = os.path.join(scratch, os.path.basename(members[0]))
                with zf.open(members[0]) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as e:
            raise SourceFileError(f"{url}: unreadable zip archive: {e}") from None
        return target
    return local


def input_fingerprints(url: str, options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """What changes when the file changes: first the fingerprint records keep (a local file's size and modification
    time, so a file copied or moved with its times is the same input; elsewhere fsspec's key, the ETag), then the
    one older records kept (fsspec's key, which for a local file also changed with its path and inode)."""
    fs, path = _fs(url, options)
    key = str(fs.ukey(path))
    if not isinstance(fs, LocalFileSystem):
        return (key,)
    info = fs.info(path)
    return (f"size={info['size']} mtime={info['mtime']!r}", key)


def copy_to_parquet(con: Any, sql: str, out: str, params: Mapping[str, Any] | None = None) -> int:
    """Stream a query's rows into a local zstd Parquet file; returns the row count."""
    target = out.replace("'", "''")
    con.execute(f"COPY ({sql}) TO '{target}' (FORMAT parquet, COMPRESSION zstd)", dict(params or {}))
    return int(con.execute("SELECT count(*) FROM read_parquet($p)", {"p": out}).fetchone()[0])
