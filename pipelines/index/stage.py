"""Index: build the visual cache over one source's features (rebuilt only when they change) and query it."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from model.imagebind.encoder import ImageBind, encoder_id_for
from pipelines.config import Config
from pipelines.errors import InputError
from stores import features
from stores.index import BuildSettings, CacheIndex, build, read_meta
from stores.lease import lease
from stores.workspace import Workspace


class Neighbour(BaseModel):
    """One cached feature near a query."""

    similarity: float
    uid: str
    caption: str
    url: str


class IndexResult(BaseModel):
    """What the index stage produced (and, with a query image, what it found)."""

    name: str
    encoder_id: str
    source: str
    built: bool
    count: int
    index_key: str | None
    recall_at_10: float
    index_bytes: int
    values_bytes: int
    build_seconds: float
    neighbours: list[Neighbour] | None = None
    seconds: float

    def summary(self) -> str:
        """Human lines."""
        state = "built" if self.built else "unchanged"
        lines = [
            f"index {self.name} ({state}): {self.count} {self.source} features of {self.encoder_id}, "
            f"{self.index_key}, recall@10 {self.recall_at_10:.3f}, index {self.index_bytes / 2**20:.1f} MB "
            f"+ values {self.values_bytes / 2**20:.1f} MB"
        ]
        for n in self.neighbours or []:
            lines.append(f"  {n.similarity:+.3f}  {n.caption}  ({n.url})")
        return "\n".join(lines)


def run(cfg: Config, force: bool = False, query_image: str | None = None, k: int = 5) -> IndexResult:
    """Build index `index.name` over the features of `index.source` if they changed; optionally query it."""
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    m, ix = cfg.model, cfg.index
    encoder_id = encoder_id_for(m.imagebind, m.imagebind_checkpoint, cfg.seed)
    files, fingerprint = features.feature_files(ws, encoder_id, ix.source)
    if not files:
        raise FileNotFoundError(f"no features of source {ix.source!r} for {encoder_id}; run `ibllm extract` first")
    meta = features.read_meta(ws, encoder_id) or {}
    dim = int(meta.get("dim") or len(features.placeholder(ws, encoder_id)))
    settings = BuildSettings(
        max_index_memory=ix.max_index_memory,
        max_query_ms=ix.max_query_ms,
        index_key=ix.index_key,
        index_param=ix.index_param,
        rescore=ix.rescore,
        holdout=ix.holdout,
        seed=cfg.seed,
        target_recall=ix.target_recall,
        values=ix.values,
    )
    built = False
    if force or _stale(ws, ix.name, fingerprint, settings):
        with lease(ws, "index", ix.name):  # one build at a time; a concurrent run may have built it meanwhile
            if force or _stale(ws, ix.name, fingerprint, settings):
                build(ws, ix.name, files, encoder_id, dim, fingerprint, settings)
                built = True
    index = CacheIndex.open(ws, ix.name, encoder_id=encoder_id, dim=dim, use_gpu=ix.use_gpu)
    neighbours = None
    if query_image:
        encoder = ImageBind.load(m.imagebind, checkpoint=m.imagebind_checkpoint, seed=cfg.seed)
        if not os.path.isfile(query_image):
            raise InputError(f"--query-image: no such file: {query_image}")
        try:
            query = encoder.embed_images([query_image], max_pixels=m.max_image_pixels).numpy()
        except ValueError as e:  # not an image: the decoder's message names the file
            raise InputError(f"--query-image: {e}") from None
        sims, ids = index.search(query, k)
        rows = next(index.lookup(ids))
        neighbours = [Neighbour(similarity=float(s), **r) for s, r in zip(sims[0], rows, strict=False)]
    info = index.meta
    return IndexResult(
        name=ix.name,
        encoder_id=encoder_id,
        source=ix.source,
        built=built,
        count=info["count"],
        index_key=info.get("index_key"),
        recall_at_10=info["recall_at_10"],
        index_bytes=info["index_bytes"],
        values_bytes=info["values_bytes"],
        build_seconds=info["build_seconds"],
        neighbours=neighbours,
        seconds=round(time.perf_counter() - start, 3),
    )


def _stale(ws: Workspace, name: str, fingerprint: str, settings: BuildSettings) -> bool:
    meta = read_meta(ws, name)
    if meta is None:
        return True
    built_with = {"values": "float16"} | meta.get("settings", {})  # indexes built before the setting: fp16
    return meta["fingerprint"] != fingerprint or built_with != settings.__dict__
