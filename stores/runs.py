"""The files of a training run's folder (`checkpoints/stage<N>/<run_id>/`): its record and its newest checkpoint."""

from __future__ import annotations

import json
import posixpath

from stores.workspace import Workspace

RUN_FILE = "run.json"  # the run's record: status, attempts, job, final checkpoint (written by the driver)
LATEST_FILE = "latest.json"  # the newest committed checkpoint and the loss history (written after each checkpoint)
PROGRESS_FILE = "progress.json"  # rank 0's newest progress line, for the driver's console (written every interval)


def newest_complete(ws: Workspace, stage_folder: str) -> str | None:
    """The checkpoint of the newest complete run under a stage's folder (a path of `ws`), else None."""
    for path in sorted(ws.glob(posixpath.join(stage_folder, "*", RUN_FILE)), reverse=True):
        doc = json.loads(ws.read_bytes(path))
        if doc.get("status") == "complete" and doc.get("checkpoint"):
            return doc["checkpoint"]
    return None
