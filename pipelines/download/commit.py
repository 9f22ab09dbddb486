"""Download commits: img2dataset writes into a private staging folder per run; complete shards move into place."""

from __future__ import annotations

import json
import logging
import posixpath
import secrets

from stores.ledger import Ledger
from stores.workspace import Workspace

log = logging.getLogger(__name__)
STAGING = ".staging"  # ws/.staging/download/<output>/<settings hash>-<run token>/
DONE_MARK = "_committed.json"  # img2dataset skips a shard whose `<id>_*.json` is in its output folder


def new_staging(ws: Workspace, ledger: Ledger, done: list[str]) -> str:
    """A fresh staging folder for one run, in which the shards already committed (`done`) are marked for img2dataset
    to skip."""
    folder = ws.path(STAGING, "download", ledger.output, f"{ledger.config_hash}-{secrets.token_hex(4)}")
    ws.makedirs(folder)
    for sid in done:
        ws.write_bytes(posixpath.join(folder, f"{sid}{DONE_MARK}"), b"{}")
    return folder


def completed(ws: Workspace, staging: str) -> int:
    """How many shards img2dataset completed in a staging folder (it writes a shard's stats file last)."""
    return len(ws.glob(posixpath.join(staging, "*_stats.json")))


def commit_staged(
    ws: Workspace, ledger: Ledger, staging: str, folder: str, expected: list[str]
) -> tuple[int, list[str]]:
    """Move every shard completed in `staging` into `folder` and record it; returns (new, missing shard ids).

    A shard is complete when its stats file exists. Its files are moved (renamed on a local disk), hashed, and
    recorded, the record last: a crash in between leaves files no record names, redone by the next run.
    """
    new, missing = 0, []
    committed = ledger.committed()
    for sid in expected:
        if sid in committed:
            continue
        stats_path = posixpath.join(staging, f"{sid}_stats.json")
        if not ws.exists(stats_path):
            ledger.record_failure(sid, "img2dataset did not complete this shard (no stats file)")
            missing.append(sid)
            continue
        stats = json.loads(ws.read_bytes(stats_path))
        files = []
        for name in (f"{sid}.tar", f"{sid}.parquet", f"{sid}_stats.json"):
            final = posixpath.join(folder, name)
            ws.rename(posixpath.join(staging, name), final)
            files.append(final)
        ledger.record_existing(sid, files, rows=int(stats.get("successes", 0)), extra={"stats": _brief(stats)})
        new += 1
    return new, missing


def harvest(ws: Workspace, ledger: Ledger, folder: str, expected: list[str]) -> int:
    """Commit the complete shards left in staging folders of earlier runs (killed before their commit) that were
    made with the same settings, then delete every earlier staging folder of this output; returns the shards saved.

    Called under the output's lease, so no live run is writing to those folders.
    """
    saved = 0
    for old in ws.glob(ws.path(STAGING, "download", ledger.output, "*")):
        if posixpath.basename(old).startswith(f"{ledger.config_hash}-"):
            ready = [sid for sid in ledger.pending(expected) if ws.exists(posixpath.join(old, f"{sid}_stats.json"))]
            if ready:
                saved += commit_staged(ws, ledger, old, folder, ready)[0]
                log.info("download %s: committed %d shard(s) an interrupted run had completed", ledger.output, saved)
        remove_tree(ws, old)
    return saved


def remove_tree(ws: Workspace, path: str) -> None:
    """Delete a staging folder and everything in it."""
    if ws.exists(path):
        ws.fs.rm(path, recursive=True)


def _brief(stats: dict) -> dict:
    return {k: stats.get(k) for k in ("count", "successes", "failed_to_download", "failed_to_resize", "duration")}
