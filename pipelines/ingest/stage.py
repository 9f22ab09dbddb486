"""Ingest: normalise every configured source's metadata files into `sources/<source>/*.parquet`, one shard a file."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time

from pydantic import BaseModel

from pipelines.config import Config, ConfigError, SourceConfig
from pipelines.console import Progress
from pipelines.errors import InputError
from stores import sources as formats
from stores.ledger import Ledger
from stores.metadata import CAPTION_MAX_CHARS
from stores.workspace import Workspace

log = logging.getLogger(__name__)


class SourceIngest(BaseModel):
    """What ingest did for one source."""

    source: str
    files: int
    written: int
    skipped: int
    rows: int
    output: str


class IngestResult(BaseModel):
    """What the ingest stage produced."""

    sources: list[SourceIngest]
    seconds: float

    def summary(self) -> str:
        """Human lines."""
        return "\n".join(
            f"{s.source}: {s.rows} rows from {s.files} file(s) ({s.written} ingested, {s.skipped} unchanged)"
            f" -> {s.output}"
            for s in self.sources
        )


def shard_id_for(recorded: str) -> str:
    """A stable shard id for an input file: its name and a short hash of where it is as records keep it (a file
    inside the workspace: its path relative to the root, so a moved or copied workspace keys it the same)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(recorded))[:60].strip("._-") or "file"
    return f"{stem}-{hashlib.sha1(recorded.encode()).hexdigest()[:8]}"


def shard_ids(ws: Workspace, ledger: Ledger, files: list[str]) -> dict[str, str]:
    """Each input file's shard id: the committed shard made from it when there is one (an older ibllm keyed a file
    by its full path, which a move of the workspace changed: its record's input is found again inside this one),
    else `shard_id_for` its recorded location."""
    made_from = {
        ws.to_record(ws.locate(rec.extra["input_url"])): sid
        for sid, rec in ledger.committed().items()
        if rec.extra.get("input_url")
    }
    return {f: made_from.get(ws.to_record(f)) or shard_id_for(ws.to_record(f)) for f in files}


def settings(src: SourceConfig, caption_max_chars: int) -> dict[str, object]:
    """What shapes a source's normalised output (`non_finite`: NaN and infinite numbers are ingested as NULL;
    `captions`: control characters become spaces, and captions are cut to `caption_max_chars`)."""
    return {
        "format": src.format,
        "columns": dict(src.columns),
        "non_finite": "null",
        "captions": "clean",
        "caption_max_chars": caption_max_chars,
    }


def input_files(ws: Workspace, src: SourceConfig) -> list[str]:
    """The metadata files of a source (the synthetic source's default is its metadata in the workspace)."""
    if src.format == "synthetic" and not src.paths:
        metadata = ws.url("synthetic", "metadata.parquet")
        if not ws.exists(ws.synthetic("metadata.parquet")):
            raise InputError(f"source {src.name!r}: no synthetic metadata at {metadata}: run `ibllm synthetic` first")
        return [metadata]
    return formats.expand_inputs(src.paths, ws.options_for)


def ingest_source(
    ws: Workspace, src: SourceConfig, force: bool = False, caption_max_chars: int = CAPTION_MAX_CHARS
) -> SourceIngest:
    """Validate every changed file of one source, then write one normalised Parquet shard per file."""
    adapter = formats.adapter_for(src.format, src.columns)
    with Ledger.writing(ws, "ingest", src.name, settings(src, caption_max_chars), force=force) as ledger:
        files = input_files(ws, src)
        fingerprints = {f: formats.input_fingerprints(f, ws.options_for(f)) for f in files}
        sids = shard_ids(ws, ledger, files)
        todo = [f for f in files if not ledger.is_current(sids[f], *fingerprints[f])]
        con = formats.connect()
        with ws.scratch() as scratch:
            checked = {}
            for url in todo:  # every file is checked before anything is written
                local = formats.localise(url, scratch, ws.options_for(url))
                mapping, _ = formats.validate(con, adapter, local)
                checked[url] = (local, mapping)
            progress = Progress(log, f"ingest {src.name}")
            for done, url in enumerate(todo):
                progress.update(done, len(todo), "files")
                local, mapping = checked[url]
                available = list(formats.describe(con, adapter, local))
                sql = formats.normalised_sql(adapter, local, mapping, available, caption_max_chars)
                sid = sids[url]
                out = os.path.join(scratch, f"{sid}.parquet")
                with ledger.shard(sid) as shard:
                    con.execute(
                        f"COPY ({sql}) TO '{out}' (FORMAT parquet, COMPRESSION zstd)",
                        {"path": local, "source": src.name},
                    )
                    shard.rows = con.execute("SELECT count(*) FROM read_parquet($p)", {"p": out}).fetchone()[0]
                    shard.extra = {"input": fingerprints[url][0], "input_url": ws.to_record(url)}
                    shard.put(out, ws.sources(src.name, f"{sid}.parquet"))
        committed = ledger.committed()
        return SourceIngest(
            source=src.name,
            files=len(files),
            written=len(todo),
            skipped=len(files) - len(todo),
            rows=sum(committed[sids[f]].rows for f in files),
            output=ws.url("sources", src.name),
        )


def run(cfg: Config, force: bool = False) -> IngestResult:
    """Ingest every source of the config, in order."""
    if not cfg.sources:
        raise ConfigError("sources: the config has no sources to ingest (add entries under `sources:`)")
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    cap = cfg.curate.caption_max_chars
    results = [ingest_source(ws, src, force=force, caption_max_chars=cap) for src in cfg.sources]
    return IngestResult(sources=results, seconds=round(time.perf_counter() - start, 3))
