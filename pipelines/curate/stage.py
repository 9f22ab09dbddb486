"""Curate: filter each source's normalised metadata into url lists for img2dataset, with a funnel of every filter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time

from pydantic import BaseModel

from pipelines.config import Config, ConfigError
from stores import curation
from stores.ledger import Ledger
from stores.sources import connect
from stores.workspace import Workspace

log = logging.getLogger(__name__)
SHARD = "curated"


class FunnelRow(BaseModel):
    """Rows into and out of one filter of one source."""

    source: str
    step: str
    rows_in: int
    rows_out: int
    removed: int


class SourceCurate(BaseModel):
    """What curation did for one source."""

    source: str
    rows_in: int
    rows_out: int
    skipped: bool
    files: list[str]
    funnel: list[FunnelRow]


class CurateResult(BaseModel):
    """What the curate stage produced."""

    sources: list[SourceCurate]
    seconds: float

    def summary(self) -> str:
        """The funnel as a table."""
        lines = [f"{'source':<12} {'step':<18} {'in':>12} {'out':>12} {'removed':>10}"]
        for s in self.sources:
            for r in s.funnel:
                lines.append(f"{s.source:<12} {r.step:<18} {r.rows_in:>12,} {r.rows_out:>12,} {r.removed:>10,}")
            state = "unchanged" if s.skipped else "written"
            lines.append(f"{s.source:<12} {'= kept':<18} {s.rows_in:>12,} {s.rows_out:>12,}  ({state})")
        return "\n".join(lines)


def settings(cfg: Config, index: int) -> dict[str, object]:
    """What shapes a source's curated list: its filters, the seed, and which sources come before it."""
    src = cfg.sources[index]
    return {
        "filters": src.filters.model_dump(mode="json"),
        "seed": cfg.seed,
        "earlier": [s.name for s in cfg.sources[:index]],
    }


def curated_files(ws: Workspace, source: str) -> list[str]:
    """The committed url-list files of a source."""
    return Ledger.reader(ws, "curate", source).files(".parquet")


def _input_fingerprint(ws: Workspace, source: str, earlier: list[str]) -> str:
    h = hashlib.sha256()
    for rec in sorted(Ledger.reader(ws, "ingest", source).committed().values(), key=lambda r: r.shard_id):
        h.update(rec.checksum.encode())
    for name in earlier:
        rec = Ledger.reader(ws, "curate", name).committed_record(SHARD)
        h.update(rec.fingerprint.encode() if rec else b"-")
    return h.hexdigest()[:16]


def curate_source(cfg: Config, ws: Workspace, index: int, force: bool = False) -> SourceCurate:
    """Curate one source (after the sources before it, whose URLs win the cross-source dedup)."""
    src = cfg.sources[index]
    earlier = [s.name for s in cfg.sources[:index]]
    with Ledger.writing(ws, "curate", src.name, settings(cfg, index), force=force) as ledger:
        inputs = Ledger.reader(ws, "ingest", src.name).files(".parquet")
        if not inputs:
            raise FileNotFoundError(f"source {src.name!r} has no ingested metadata; run `ibllm ingest` first")
        fingerprint = _input_fingerprint(ws, src.name, earlier)
        if ledger.is_current(SHARD, fingerprint):
            funnel = json.loads(ws.read_bytes(ws.curated(src.name, "funnel.json")))
            return _result(src.name, funnel, curated_files(ws, src.name), skipped=True)
        earlier_files = [f for name in earlier for f in curated_files(ws, name)]
        with ws.scratch() as scratch:
            con = connect(cfg.curate.memory_limit, cfg.curate.threads, os.path.join(scratch, "spill"))
            # Remote workspaces: DuckDB reads them through fsspec.
            if not ws.is_local:
                con.register_filesystem(ws.fs)
            urls = [ws.as_url(p) for p in inputs]
            steps = curation.run_funnel(
                con, urls, src.filters.model_dump(), [ws.as_url(p) for p in earlier_files], cfg.seed
            )
            out_dir = os.path.join(scratch, "out")
            curation.write_output(con, out_dir, cfg.curate.rows_per_file)
            funnel = [
                {"source": src.name, "step": s.step, "rows_in": s.rows_in, "rows_out": s.rows_out, "removed": s.removed}
                for s in steps
            ]
            funnel_path = os.path.join(scratch, "funnel.json")
            with open(funnel_path, "w") as f:
                json.dump(funnel, f, indent=1)
            generation = secrets.token_hex(3)
            with ledger.shard(SHARD) as shard:
                for i, name in enumerate(sorted(os.listdir(out_dir))):
                    shard.put(os.path.join(out_dir, name), ws.curated(src.name, f"part-{generation}-{i:05d}.parquet"))
                shard.put(funnel_path, ws.curated(src.name, "funnel.json"))
                shard.rows = steps[-1].rows_out
                shard.extra = {"input": fingerprint}
        return _result(src.name, funnel, curated_files(ws, src.name), skipped=False)


def _result(source: str, funnel: list[dict], files: list[str], skipped: bool) -> SourceCurate:
    rows = [FunnelRow(**r) for r in funnel]
    return SourceCurate(
        source=source,
        rows_in=rows[0].rows_in,
        rows_out=rows[-1].rows_out,
        skipped=skipped,
        files=files,
        funnel=rows,
    )


def run(cfg: Config, force: bool = False) -> CurateResult:
    """Curate every source in config order."""
    if not cfg.sources:
        raise ConfigError("sources: the config has no sources to curate (add entries under `sources:`)")
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    results = [curate_source(cfg, ws, i, force=force) for i in range(len(cfg.sources))]
    return CurateResult(sources=results, seconds=round(time.perf_counter() - start, 3))
