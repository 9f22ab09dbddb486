"""Download: img2dataset turns each source's curated url lists into webdataset shards, resumably."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would call home at import

import pyarrow.parquet as pq
from pydantic import BaseModel

from pipelines.config import Config
from stores.ledger import Ledger
from stores.workspace import Workspace

log = logging.getLogger(__name__)
ADDITIONAL_COLUMNS = ["uid", "source", "similarity"]


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


def settings(cfg: Config, curated_checksum: str) -> dict[str, object]:
    """What shapes the shards: resizing, sharding, and the exact url list they were cut from."""
    d = cfg.download
    return {
        "image_size": d.image_size,
        "resize_mode": d.resize_mode,
        "samples_per_shard": d.samples_per_shard,
        "min_image_size": d.min_image_size,
        "max_image_area": d.max_image_area,
        "disallowed_header_directives": sorted(d.disallowed_header_directives),
        "url_list": curated_checksum,
    }


def expected_shards(ws: Workspace, url_lists: list[str], per_shard: int) -> list[str]:
    """img2dataset's shard ids for these url lists: each file is cut into ceil(rows / per_shard) shards, in order."""
    total = 0
    for path in sorted(url_lists):
        with ws.open(path, "rb") as f:
            total += math.ceil(pq.ParquetFile(f).metadata.num_rows / per_shard)
    return [f"{i:05d}" for i in range(total)]


def img2dataset_download(cfg: Config, url_list: str, output_folder: str) -> None:
    """One img2dataset run with the config's settings (incremental: completed shards are kept)."""
    from img2dataset import download

    d = cfg.download
    distributor = d.distributor
    if distributor == "multiprocessing" and cfg.ray.address:
        distributor = "ray"
    download(
        url_list=url_list,
        output_folder=output_folder,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=ADDITIONAL_COLUMNS,
        output_format="webdataset",
        image_size=d.image_size,
        resize_mode=d.resize_mode,
        resize_only_if_bigger=True,
        encode_format="jpg",
        encode_quality=95,
        processes_count=d.processes,
        thread_count=d.threads,
        number_sample_per_shard=d.samples_per_shard,
        min_image_size=d.min_image_size,
        max_image_area=d.max_image_area or float("inf"),
        timeout=d.timeout,
        retries=d.retries,
        disallowed_header_directives=d.disallowed_header_directives,
        incremental_mode="incremental",
        distributor=distributor,
        enable_wandb=False,
    )


def commit_shards(ws: Workspace, ledger: Ledger, folder: str, expected: list[str]) -> tuple[int, list[str]]:
    """Record every shard img2dataset completed (its stats file exists); returns (new, missing shard ids)."""
    new, missing = 0, []
    committed = ledger.committed()
    for sid in expected:
        stats_path = posixpath.join(folder, f"{sid}_stats.json")
        if sid in committed:
            continue
        if not ws.exists(stats_path):
            ledger.record_failure(sid, "img2dataset did not complete this shard (no stats file)")
            missing.append(sid)
            continue
        stats = json.loads(ws.read_bytes(stats_path))
        files = [posixpath.join(folder, f"{sid}.{ext}") for ext in ("tar", "parquet")] + [stats_path]
        ledger.record_existing(sid, files, rows=int(stats.get("successes", 0)), extra={"stats": _brief(stats)})
        new += 1
    return new, missing


def _brief(stats: dict) -> dict:
    return {k: stats.get(k) for k in ("count", "successes", "failed_to_download", "failed_to_resize", "duration")}


def download_list(
    cfg: Config, ws: Workspace, source: str, url_lists: list[str], list_folder: str, output: str, force: bool
) -> SourceDownload:
    """Download one url-list folder into one shard folder, commit what completed, and count the outcome."""
    rec = Ledger.reader(ws, "curate", source).committed_record("curated")
    checksum = ",".join(sorted(_checksums(ws, url_lists))) if rec is None or output != source else rec.checksum
    ledger = Ledger(ws, "download", output.replace("/", "."), settings(cfg, checksum), force=force)
    folder = ws.shards(output)
    expected = expected_shards(ws, url_lists, cfg.download.samples_per_shard)
    todo = ledger.pending(expected)
    start = time.perf_counter()
    if todo:
        img2dataset_download(cfg, ws.url(*_rel(ws, list_folder)), ws.url("shards", output))
    took = time.perf_counter() - start
    new, missing = commit_shards(ws, ledger, folder, expected)
    committed = ledger.committed()
    attempted = sum(r.extra.get("stats", {}).get("count") or 0 for r in committed.values())
    succeeded = sum(r.rows for r in committed.values())
    return SourceDownload(
        source=source,
        output=ws.url("shards", output),
        shards=len(committed),
        new_shards=new,
        failed_shards=missing,
        attempted=attempted,
        succeeded=succeeded,
        failed=attempted - succeeded,
        images_per_second=round(sum(committed[s].extra["stats"]["count"] for s in todo if s in committed) / took, 1)
        if todo and took > 0
        else None,
    )


def _rel(ws: Workspace, path: str) -> list[str]:
    return posixpath.relpath(path, ws.base).split("/")


def _checksums(ws: Workspace, paths: list[str]) -> list[str]:
    import hashlib

    return [hashlib.sha256(ws.read_bytes(p)).hexdigest()[:16] for p in paths]


def run(cfg: Config, force: bool = False) -> DownloadResult:
    """Download every source's curated url lists."""
    if not cfg.sources:
        raise ValueError("the config has no sources to download (add entries under `sources:`)")
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    results = []
    for src in cfg.sources:
        lists = Ledger.reader(ws, "curate", src.name).files(".parquet")
        if not lists:
            raise FileNotFoundError(f"source {src.name!r} has no curated url list; run `ibllm curate` first")
        results.append(download_list(cfg, ws, src.name, lists, ws.curated(src.name), src.name, force))
    return DownloadResult(sources=results, seconds=round(time.perf_counter() - start, 3))
