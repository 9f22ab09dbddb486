"""The visual cache: an autofaiss index over a feature set, an fp16 or fp32 value store, atomic versions, search."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stores.errors import StoreInputError
from stores.index_plan import choose_key, metric_for, tune_search
from stores.workspace import Workspace

log = logging.getLogger(__name__)
INDEX_FILE, ROWS, META, CURRENT = "knn.index", "rows.parquet", "meta.json", "CURRENT.json"
VALUES = "values.f16"  # the fp16 value store; an fp32 one is values.f32
ValueType = Literal["float16", "float32"]
VALUE_FILES: dict[str, str] = {"float16": VALUES, "float32": "values.f32"}


class IndexMismatch(StoreInputError):
    """An index that does not fit the encoder or the data it is used with."""


@dataclass(frozen=True)
class BuildSettings:
    """How the index is built: autofaiss's memory and speed budgets, or a fixed index key."""

    max_index_memory: str = "4G"
    max_query_ms: float = 10.0
    index_key: str | None = None  # None: stores.index_plan.choose_key, or autofaiss's choice for small sets
    index_param: str | None = None  # the key's first search parameters (autofaiss tunes them when None)
    rescore: int = 8  # candidates per wanted neighbour that are re-scored exactly (tuning may raise it)
    holdout: int = 500  # held-out queries (text embeddings of the set) for recall@10
    seed: int = 0
    target_recall: float = 0.95  # nprobe and re-scoring are raised until recall@10 on the held-out queries reaches it
    values: ValueType = "float16"  # the value store: float32 keeps the features exactly (twice the disk)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _embeddings(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def stage_features(
    files: list[str], ws: Workspace, encoder_id: str, dim: int, folder: str, settings: BuildSettings
) -> tuple[int, np.ndarray]:
    """Stream feature Parquet into `folder`: normalised float32 .npy parts for autofaiss, the value store (fp16 or
    fp32, as `settings.values`), and rows.parquet (uid, caption, url per id). Returns (count, held-out queries)."""
    rng = np.random.default_rng(settings.seed)
    os.makedirs(os.path.join(folder, "emb"))
    rows, queries, n = [], [], 0
    with open(os.path.join(folder, VALUE_FILES[settings.values]), "wb") as values:
        for i, path in enumerate(files):
            with ws.open(path, "rb") as f:
                table = pq.read_table(f, columns=["uid", "caption", "url", "image_emb", "text_emb", "encoder_id"])
            if table.num_rows == 0:
                continue
            ids = set(table.column("encoder_id").to_pylist())
            if ids != {encoder_id}:
                raise IndexMismatch(f"{path}: features of encoder(s) {sorted(ids)}, expected only {encoder_id!r}")
            width = table.schema.field("image_emb").type.list_size
            if width != dim:
                raise IndexMismatch(f"{path}: image_emb has {width} dimensions, the encoder gives {dim}")
            emb = _normalise(_embeddings(table.column("image_emb"), dim))
            np.save(os.path.join(folder, "emb", f"{i:06d}.npy"), emb)
            values.write(emb.astype(settings.values).tobytes())
            rows.append(table.select(["uid", "caption", "url"]))
            pick = rng.random(table.num_rows) < min(1.0, 4.0 * settings.holdout / max(1, table.num_rows * len(files)))
            queries.append(_embeddings(table.column("text_emb"), dim)[pick])
            n += table.num_rows
    if n == 0:
        raise IndexMismatch("the feature set is empty: nothing to index")
    pq.write_table(pa.concat_tables(rows), os.path.join(folder, ROWS))
    return n, _normalise(np.concatenate(queries)[: settings.holdout])


def exact_top_k(values: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Ids of the k largest inner products, by brute force over the value store in chunks."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(values), chunk):
        s = queries @ values[start : start + chunk].astype(np.float32).T  # (Q, C)
        s_all, i_all = (
            np.concatenate([best_s, s], 1),
            np.concatenate([best_i, np.arange(start, start + s.shape[1])[None].repeat(len(queries), 0)], 1),
        )
        top = np.argpartition(-s_all, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_i


def build(
    ws: Workspace, name: str, files: list[str], encoder_id: str, dim: int, fingerprint: str, settings: BuildSettings
) -> dict[str, Any]:
    """Build a new version of index `name` and make it current (the pointer is written last)."""
    from autofaiss import build_index
    from autofaiss.utils.cast import cast_memory_to_bytes

    start = time.perf_counter()
    with ws.scratch() as scratch:
        n, queries = stage_features(files, ws, encoder_id, dim, scratch, settings)
        key, param = settings.index_key, settings.index_param
        if key is None:
            key, param = choose_key(n, dim, cast_memory_to_bytes(settings.max_index_memory))
        metric = metric_for(key, dim)
        index, infos = build_index(
            embeddings=os.path.join(scratch, "emb"),
            index_path=os.path.join(scratch, INDEX_FILE),
            index_infos_path=os.path.join(scratch, "infos.json"),
            index_key=key,
            index_param=param,
            max_index_memory_usage=settings.max_index_memory,
            current_memory_available="8G",
            max_index_query_time_ms=settings.max_query_ms,
            metric_type=metric,
            verbose=logging.WARNING,
        )
        if index is None:
            raise RuntimeError(f"autofaiss could not build an index within {settings.max_index_memory}")
        meta = {
            "name": name,
            "encoder_id": encoder_id,
            "fingerprint": fingerprint,
            "dim": dim,
            "count": n,
            "index_key": (infos or {}).get("index_key") or key,
            "index_param": (infos or {}).get("index_param") or param,
            "metric": metric,
            "settings": settings.__dict__,
            "index_bytes": os.path.getsize(os.path.join(scratch, INDEX_FILE)),
            "values": settings.values,
            "values_bytes": os.path.getsize(os.path.join(scratch, VALUE_FILES[settings.values])),
        }
        opened = CacheIndex(scratch, meta)
        truth = exact_top_k(opened.values, queries, 10)
        nprobe, meta["rescore"], meta["recall_at_10"] = tune_search(
            opened, queries, truth, settings.target_recall, settings.max_query_ms
        )
        meta["index_param"] = _with_nprobe(meta["index_param"], nprobe)
        meta["holdout_queries"] = len(queries)
        meta["build_seconds"] = round(time.perf_counter() - start, 2)
        with open(os.path.join(scratch, META), "w") as f:
            json.dump(meta, f, indent=1)
        version = f"v-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        for fname in (INDEX_FILE, VALUE_FILES[settings.values], ROWS, META):
            ws.upload(os.path.join(scratch, fname), ws.index(name, version, fname))
    previous = current_version(ws, name)
    ws.write_bytes(ws.index(name, CURRENT), json.dumps({"version": version}).encode())  # the commit point
    if previous:
        for path in ws.glob(ws.index(name, previous, "*")):
            ws.remove(path)
    return meta


def _with_nprobe(param: str | None, nprobe: str | None) -> str | None:
    """autofaiss's search parameters with nprobe replaced by the tuned one (efSearch, ht... kept)."""
    kept = [kv for kv in (param or "").split(",") if kv and not kv.startswith("nprobe=")]
    return ",".join(([nprobe] if nprobe else []) + kept) or None


def current_version(ws: Workspace, name: str) -> str | None:
    """The version directory the index `name` points at, or None when it was never built."""
    path = ws.index(name, CURRENT)
    return json.loads(ws.read_bytes(path))["version"] if ws.exists(path) else None


def value_type(meta: dict[str, Any]) -> ValueType:
    """The value store's type of an index (float16 for indexes built before the setting existed)."""
    return meta.get("values", "float16")


def _local_dir(ws: Workspace, name: str, version: str) -> str:
    if ws.is_local:
        return ws.index(name, version)
    cache = Path(os.environ.get("IBLLM_CACHE", Path.home() / ".cache" / "ibllm")) / "index" / name / version
    if not (cache / META).exists():
        cache.mkdir(parents=True, exist_ok=True)
        meta = json.loads(ws.read_bytes(ws.index(name, version, META)))
        for fname in (INDEX_FILE, VALUE_FILES[value_type(meta)], ROWS, META):  # meta.json last: the completion mark
            ws.fs.get_file(ws.index(name, version, fname), str(cache / fname))
    return str(cache)


def read_meta(ws: Workspace, name: str) -> dict[str, Any] | None:
    """meta.json of the version of index `name` in service, without opening the index; None if never built."""
    version = current_version(ws, name)
    return json.loads(ws.read_bytes(ws.index(name, version, META))) if version else None


class CacheIndex:
    """An opened index version: batched approximate search, exact re-scoring from the value store, row lookup."""

    def __init__(self, folder: str, meta: dict[str, Any], use_gpu: bool = False) -> None:
        self.meta, self.dim, self.count = meta, int(meta["dim"]), int(meta["count"])
        self.index = faiss.read_index(os.path.join(folder, INDEX_FILE))
        if meta.get("index_param"):
            faiss.ParameterSpace().set_index_parameters(self.index, meta["index_param"])
        if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            try:
                self.index = faiss.index_cpu_to_all_gpus(self.index)
            except RuntimeError as e:  # faiss-gpu has no fast-scan PQ, for one: the CPU index serves instead
                log.warning(
                    "index %s (%s) stays on the CPU: faiss-gpu cannot hold it: %s",
                    meta.get("name"),
                    meta.get("index_key"),
                    e,
                )
        values = value_type(meta)
        self.values = np.memmap(os.path.join(folder, VALUE_FILES[values]), values, "r", shape=(self.count, self.dim))
        self.rows = pq.read_table(os.path.join(folder, ROWS))
        self.rescore = int(meta.get("rescore") or meta.get("settings", {}).get("rescore", 8))

    @classmethod
    def open(
        cls, ws: Workspace, name: str, encoder_id: str | None = None, dim: int | None = None, use_gpu: bool = False
    ) -> CacheIndex:
        """Open the current version of index `name`, checking it was built for this encoder and dimension."""
        version = current_version(ws, name)
        if version is None:
            raise FileNotFoundError(f"no index {name!r} in {ws.url()}; run `ibllm index` first")
        folder = _local_dir(ws, name, version)
        with open(os.path.join(folder, META)) as f:
            meta = json.load(f)
        if encoder_id is not None and meta["encoder_id"] != encoder_id:
            raise IndexMismatch(f"index {name!r} holds features of {meta['encoder_id']}, not of {encoder_id}")
        if dim is not None and int(meta["dim"]) != dim:
            raise IndexMismatch(f"index {name!r} has dimension {meta['dim']}, the encoder gives {dim}")
        return cls(folder, meta, use_gpu)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for a batch (B, D): approximate candidates, then exact scores from the values.

        The queries are used as given, not normalised: the similarities are their inner products with the stored
        (unit) features, as faiss's inner-product search returns them. On an L2 index over unit vectors the
        candidates rank the same, since |q - x|^2 = |q|^2 + 1 - 2 q.x.

        Returns:
            sims (B, k) float32, exact, descending; ids (B, k) int64 (-1 where fewer than k exist).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        kc = min(self.count, max(k, k * self.rescore))
        _, cand = self.index.search(q, kc)  # (B, kc)
        vals = self.gather(np.where(cand < 0, 0, cand))  # (B, kc, D)
        sims = np.einsum("bkd,bd->bk", vals, q)
        sims[cand < 0] = -np.inf
        order = np.argsort(-sims, axis=1)[:, :k]
        ids = np.take_along_axis(cand, order, 1)
        return np.take_along_axis(sims, order, 1).astype(np.float32), ids

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Values of ids of any shape, as float32 (..., D): one vectorised read of the memory-mapped store."""
        flat = ids.reshape(-1)
        uniq, inverse = np.unique(flat, return_inverse=True)
        return self.values[uniq].astype(np.float32)[inverse].reshape(*ids.shape, self.dim)

    def lookup(self, ids: np.ndarray) -> Iterator[list[dict[str, str]]]:
        """uid, caption and url of each id, per query row."""
        for row in ids:
            yield self.rows.take(row[row >= 0]).to_pylist()
