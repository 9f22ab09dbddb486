"""Download: img2dataset turns each source's curated url lists into webdataset shards, resumably."""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import time

import pyarrow.parquet as pq
from pydantic import BaseModel

from pipelines.config import Config, ConfigError
from pipelines.console import Progress, polling
from pipelines.download.commit import commit_staged, completed, harvest, new_staging, remove_tree
from pipelines.download.decode import DECODER_ID, decoder_for
from stores.catalog import Catalog, outputs
from stores.ledger import Ledger
from stores.workspace import Workspace

log = logging.getLogger(__name__)
RETRY_COLUMNS = ["uid", "source", "url", "caption", "similarity"]


class SourceDownload(BaseModel):
    """What the download did for one source (or one retry round of it)."""

    source: str
    output: str
    shards: int
    new_shards: int
    failed_shards: list[str]
    attempted: int
    succeeded: int
    failed: int
    images_per_second: float | None


class DownloadResult(BaseModel):
    """What the download stage produced."""

    sources: list[SourceDownload]
    seconds: float

    def summary(self) -> str:
        """Human lines."""
        lines = []
        for s in self.sources:
            rate = f", {s.images_per_second:.0f} images/s" if s.images_per_second else ""
            lines.append(
                f"{s.source}: {s.succeeded}/{s.attempted} images in {s.shards} shard(s) ({s.new_shards} new{rate})"
                f" -> {s.output}"
            )
            if s.failed_shards:
                lines.append(f"  incomplete shards (rerun to retry): {', '.join(s.failed_shards)}")
        return "\n".join(lines)


def settings(cfg: Config, source: str, curated_checksum: str) -> dict[str, object]:
    """What shapes the shards: the decoder and its checks, which addresses may be fetched, sharding, and the exact url
    list they were cut from."""
    d = cfg.download
    decoder = decoder_for(cfg, source)
    return {
        "image_size": d.image_size,
        "resize_mode": d.resize_mode,
        "samples_per_shard": d.samples_per_shard,
        "min_image_size": d.min_image_size,
        "max_image_area": d.max_image_area,
        "min_width": decoder.min_width,
        "min_height": decoder.min_height,
        "max_aspect_ratio": None if decoder.max_aspect_ratio == math.inf else decoder.max_aspect_ratio,
        "decoder": DECODER_ID,
        "disallowed_header_directives": sorted(d.disallowed_header_directives),
        "allow_private_addresses": allow if isinstance(allow := d.allow_private_addresses, bool) else sorted(allow),
        "url_list": curated_checksum,
    }


def expected_shards(ws: Workspace, url_lists: list[str], per_shard: int) -> list[str]:
    """img2dataset's shard ids for these url lists: each file is cut into ceil(rows / per_shard) shards, in order."""
    total = 0
    for path in sorted(url_lists):
        with ws.open(path, "rb") as f:
            total += math.ceil(pq.ParquetFile(f).metadata.num_rows / per_shard)
    return [f"{i:05d}" for i in range(total)]


def shard_folder(ws: Workspace, output: str) -> str:
    """Where an output's shards live: `shards/<source>/`, retry rounds in `shards/<source>/retry-NN/`."""
    source, _, tail = output.partition(".retry-")
    return ws.shards(source, f"retry-{tail}") if tail else ws.shards(source)


def download_into(
    cfg: Config, ws: Workspace, source: str, output: str, url_lists: list[str], list_checksum: str, force: bool
) -> SourceDownload:
    """Download url lists into an output's shard folder, commit what completed, and count the outcome."""
    with Ledger.writing(ws, "download", output, settings(cfg, source, list_checksum), force=force) as ledger:
        folder = shard_folder(ws, output)
        expected = expected_shards(ws, url_lists, cfg.download.samples_per_shard)
        harvest(ws, ledger, folder, expected)
        todo = ledger.pending(expected)
        start = time.perf_counter()
        new, missing = 0, []
        if todo:
            list_folder = posixpath.dirname(url_lists[0])
            from pipelines.download.engine import img2dataset_download  # img2dataset imports torch: only when needed

            pending = set(todo)
            done_before = [sid for sid in expected if sid not in pending]
            staging = new_staging(ws, ledger, done_before)
            progress = Progress(log, f"download {output}")

            def shards_done() -> None:
                progress.update(len(done_before) + completed(ws, staging), len(expected), "shards")

            with polling(shards_done):
                img2dataset_download(cfg, source, ws.as_url(list_folder), ws.as_url(staging))
            new, missing = commit_staged(ws, ledger, staging, folder, todo)
            remove_tree(ws, staging)
        took = time.perf_counter() - start
        committed = ledger.committed()
        attempted = sum(r.extra.get("stats", {}).get("count") or 0 for r in committed.values())
        done_now = sum(committed[s].extra["stats"]["count"] or 0 for s in todo if s in committed)
        return SourceDownload(
            source=source,
            output=ws.as_url(folder),
            shards=len(committed),
            new_shards=new,
            failed_shards=missing,
            attempted=attempted,
            succeeded=sum(r.rows for r in committed.values()),
            failed=attempted - sum(r.rows for r in committed.values()),
            images_per_second=round(done_now / took, 1) if todo and took > 0 else None,
        )


def download_source(cfg: Config, ws: Workspace, source: str, force: bool) -> SourceDownload:
    """First download of a source's curated url lists (or its resumption)."""
    ledger = Ledger.reader(ws, "curate", source)
    rec = ledger.committed_record("curated")
    if rec is None:
        raise FileNotFoundError(f"source {source!r} has no curated url list; run `ibllm curate` first")
    lists = ledger.files(".parquet")
    if not lists:
        return _nothing_to_do(ws, source, source)
    return download_into(cfg, ws, source, source, lists, rec.fingerprint, force)


def retry_source(cfg: Config, ws: Workspace, source: str, force: bool) -> SourceDownload:
    """Download again, into new shards, the samples whose last attempt failed for a retryable reason.

    An unfinished retry round is resumed; otherwise a new round starts from the catalog's retryable failures.
    """
    rounds = sorted(o for o in outputs(ws, "download") if o.startswith(f"{source}.retry-"))
    if rounds:
        last = rounds[-1]
        rec = Ledger.reader(ws, "download", last)
        lists = [ws.curated(source, f"retry-{last.partition('.retry-')[2]}", "urls.parquet")]
        if rec.pending(expected_shards(ws, lists, cfg.download.samples_per_shard)):
            return download_into(cfg, ws, source, last, lists, _checksum(ws, lists[0]), force)
    failed = Catalog(ws).retryable(source, RETRY_COLUMNS)
    n = len(rounds) + 1
    output = f"{source}.retry-{n:02d}"
    if failed.num_rows == 0:
        log.info("%s: no retryable failures", source)
        return _nothing_to_do(ws, source, output)
    path = ws.curated(source, f"retry-{n:02d}", "urls.parquet")
    with ws.scratch() as scratch:
        local = posixpath.join(scratch, "urls.parquet")
        pq.write_table(failed, local)
        ws.upload(local, path)
    log.info("%s: retrying %d samples in round %d", source, failed.num_rows, n)
    return download_into(cfg, ws, source, output, [path], _checksum(ws, path), force)


def _nothing_to_do(ws: Workspace, source: str, output: str) -> SourceDownload:
    return SourceDownload(
        source=source,
        output=ws.as_url(shard_folder(ws, output)),
        shards=0,
        new_shards=0,
        failed_shards=[],
        attempted=0,
        succeeded=0,
        failed=0,
        images_per_second=None,
    )


def _checksum(ws: Workspace, path: str) -> str:
    return hashlib.sha256(ws.read_bytes(path)).hexdigest()


def run(cfg: Config, force: bool = False, retry_failed: bool = False) -> DownloadResult:
    """Download every source's curated url lists, or with `retry_failed` only their retryable failures."""
    if not cfg.sources:
        raise ConfigError("sources: the config has no sources to download (add entries under `sources:`)")
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    results = []
    for src in cfg.sources:
        step = retry_source if retry_failed else download_source
        results.append(step(cfg, ws, src.name, force))
    return DownloadResult(sources=results, seconds=round(time.perf_counter() - start, 3))
