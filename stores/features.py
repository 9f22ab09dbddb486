"""Feature sets on disk: one Parquet part (and one failures file) per input shard, and the set's meta.json."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stores.ledger import Ledger
from stores.workspace import Workspace

FAILURE_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
    ]
)
META = "meta.json"


def feature_schema(dim: int) -> pa.Schema:
    """uid, source, caption, url, image_emb and text_emb (fp16, `dim` wide), clip_score, encoder_id."""
    emb = pa.list_(pa.float16(), dim)
    return pa.schema(
        [
            ("uid", pa.string()),
            ("source", pa.string()),
            ("caption", pa.string()),
            ("url", pa.string()),
            ("image_emb", emb),
            ("text_emb", emb),
            ("clip_score", pa.float32()),
            ("encoder_id", pa.string()),
        ]
    )


def _fixed(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float16).reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, dim)


def write_features(local_path: str, rows: Mapping[str, Any], dim: int) -> int:
    """Write feature rows (columns as sequences; embeddings as (N, dim) arrays) to a local Parquet file."""
    n = len(rows["uid"])
    table = pa.table(
        {
            "uid": pa.array(rows["uid"], pa.string()),
            "source": pa.array(rows["source"], pa.string()),
            "caption": pa.array(rows["caption"], pa.string()),
            "url": pa.array(rows["url"], pa.string()),
            "image_emb": _fixed(np.asarray(rows["image_emb"]).reshape(n, dim), dim),
            "text_emb": _fixed(np.asarray(rows["text_emb"]).reshape(n, dim), dim),
            "clip_score": pa.array(np.asarray(rows["clip_score"], dtype=np.float32), pa.float32()),
            "encoder_id": pa.array(rows["encoder_id"], pa.string()),
        },
        schema=feature_schema(dim),
    )
    pq.write_table(table, local_path, compression="zstd")
    return n


def write_failures(local_path: str, rows: Mapping[str, Sequence[str]]) -> int:
    """Write the samples that could not be featurised, each with its reason."""
    table = pa.table({name: pa.array(rows[name], pa.string()) for name in FAILURE_SCHEMA.names}, schema=FAILURE_SCHEMA)
    pq.write_table(table, local_path, compression="zstd")
    return table.num_rows


def read_meta(ws: Workspace, encoder_id: str) -> dict[str, Any] | None:
    """A feature set's metadata (encoder, settings, placeholder feature), or None before the first extraction."""
    path = ws.features(encoder_id, META)
    return json.loads(ws.read_bytes(path)) if ws.exists(path) else None


def write_meta(ws: Workspace, encoder_id: str, meta: Mapping[str, Any]) -> None:
    """Write a feature set's metadata in one PUT (readers see all of it or nothing)."""
    ws.write_bytes(ws.features(encoder_id, META), json.dumps(meta, indent=1).encode())


def placeholder(ws: Workspace, encoder_id: str) -> np.ndarray:
    """The feature of the all-zero preprocessed image that text-only samples use (float32, (dim,))."""
    meta = read_meta(ws, encoder_id)
    if not meta or "placeholder" not in meta:
        raise FileNotFoundError(f"feature set {encoder_id!r} has no placeholder feature yet; run `ibllm extract`")
    return np.asarray(meta["placeholder"], dtype=np.float32)


def count_rows(ws: Workspace, files: Sequence[str]) -> list[int]:
    """Rows of each feature part, from the Parquet footers."""
    out = []
    for path in files:
        with ws.open(path, "rb") as f:
            out.append(pq.ParquetFile(f).metadata.num_rows)
    return out


def read_uids(ws: Workspace, path: str) -> list[str]:
    """The uid column of one feature part."""
    with ws.open(path, "rb") as f:
        return pq.read_table(f, columns=["uid"]).column("uid").to_pylist()


def read_pairs(ws: Workspace, path: str, column: str = "image_emb") -> tuple[list[str], list[str], np.ndarray]:
    """(uids, captions, (N, dim) float32 embeddings) of one feature part: what training reads."""
    with ws.open(path, "rb") as f:
        table = pq.read_table(f, columns=["uid", "caption", column])
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return table.column("uid").to_pylist(), table.column("caption").to_pylist(), emb


def read_columns(ws: Workspace, path: str, columns: Sequence[str]) -> dict[str, list[Any]]:
    """Some scalar columns of one feature part, as Python lists."""
    with ws.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns)).to_pydict()


def feature_files(ws: Workspace, encoder_id: str, source: str) -> tuple[list[str], str]:
    """The committed feature parts of a source (as its extraction ledger lists them) and a fingerprint that changes
    when any of them does."""
    ledger = Ledger.reader(ws, "extract", f"{encoder_id}.{source}")
    recs = sorted(ledger.committed().values(), key=lambda r: r.shard_id)
    files = [f.path for r in recs for f in r.files if posixpath.basename(f.path).startswith("part-")]
    return files, hashlib.sha256("".join(r.fingerprint for r in recs).encode()).hexdigest()[:16]
