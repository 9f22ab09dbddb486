"""The files of a training run's folder (`checkpoints/stage<N>/<run_id>/`): its record and its newest checkpoint."""

from __future__ import annotations

import json
import posixpath

from stores.workspace import OutsideWorkspace, Workspace

RUN_FILE = "run.json"  # the run's record: status, attempts, job, final checkpoint (written by the driver)
LATEST_FILE = "latest.json"  # the newest committed checkpoint and the loss history (written after each checkpoint)
PROGRESS_FILE = "progress.json"  # rank 0's newest progress line, for the driver's console (written every interval)


def newest_complete(ws: Workspace, stage_folder: str) -> str | None:
    """The checkpoint of the newest complete run under a stage's folder (a path of `ws`), else None."""
    for path in sorted(ws.glob(posixpath.join(stage_folder, "*", RUN_FILE)), reverse=True):
        doc = json.loads(ws.read_bytes(path))
        if doc.get("status") == "complete" and doc.get("checkpoint"):
            return in_run(ws, posixpath.dirname(path), doc["checkpoint"])
    return None


def run_relative(ws: Workspace, run_folder: str, location: str) -> str:
    """How a run's files record a location in its folder: relative to the folder, so a copied workspace finds it."""
    path = posixpath.normpath(ws.fs._strip_protocol(location))
    if not path.startswith(run_folder.rstrip("/") + "/"):
        raise OutsideWorkspace(f"{location} is not inside the run folder {run_folder}")
    return path[len(run_folder.rstrip("/")) + 1 :]


def in_run(ws: Workspace, run_folder: str, recorded: str) -> str:
    """A location a run's files record (relative to its folder; older records: full paths) as a URL of `ws`.

    A full path is found again under this run folder by the run's own `<stage>/<run_id>/` part, so a copied or
    moved workspace reads its own checkpoints, never the original's.
    """
    folder = run_folder.rstrip("/")
    if posixpath.isabs(recorded) or "://" in recorded:
        path = posixpath.normpath(ws.fs._strip_protocol(recorded))
        marker = "/" + "/".join(folder.split("/")[-2:]) + "/"
        if marker not in path:
            raise OutsideWorkspace(f"{recorded}, recorded in {folder}, is not inside that run's folder")
        rel = path.split(marker, 1)[1]
    else:
        rel = posixpath.normpath(recorded)
        if rel.startswith("../") or rel in ("..", "."):
            raise OutsideWorkspace(f"{recorded!r}, recorded in {folder}, leads outside that run's folder")
    return ws.as_url(posixpath.join(folder, rel))
