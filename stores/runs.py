"""Training runs: each run's record and newest checkpoint (`checkpoints/stage<N>/<run_id>/`), read and written here."""

from __future__ import annotations

import json
import posixpath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stores.workspace import OutsideWorkspace, Workspace

RUN_FILE = "run.json"  # the run's record: status, attempts, job, final checkpoint (written by the driver)
LATEST_FILE = "latest.json"  # the newest committed checkpoint and the loss history (written after each checkpoint)
PROGRESS_FILE = "progress.json"  # rank 0's newest progress line, for the driver's console (written every interval)
REPORT_FILE = "report.html"  # the run's training report (curves, settings), written when an attempt ends
DIVERGED_FILE = "diverged.json"  # where and why the running attempt diverged (written by rank 0, read by the driver)
EVALUATIONS = "evaluations"  # one record per evaluation of the run's checkpoints (the catalog's `evaluations` view)
EXTERNAL = "external"  # where evaluations of checkpoints no run of the workspace made are recorded


# what reuse ignores when it compares jobs: the run id, and where the workspace lives (a moved or copied workspace's
# runs are runs of the same inputs)
_ANY_RUN = {"run_id": None, "workspace": None}


class RunRecord(BaseModel):
    """A training run's record (`run.json`): its status, attempts, the job it ran and, once done, its checkpoint."""

    model_config = ConfigDict(extra="allow")

    # running, complete (every planned step), stopped (interrupted, max_steps), diverged, failed
    status: str = "running"
    attempts: int = 0
    job: dict[str, Any] = Field(default_factory=dict, description="the training job: inputs, sizes, settings")
    relative: list[str] | None = Field(
        None, description="the job's fields that name workspace files relative to its root (older records: none)"
    )
    checkpoint: str | None = Field(None, description="the final checkpoint, relative to the run's folder")
    steps: int | None = None
    final_loss: float | None = None

    @property
    def finished(self) -> bool:
        """Complete with every planned step done (a record of before `stopped` existed may say `complete` after
        its `max_steps`: not finished)."""
        planned = self.job.get("total_steps")
        return self.status == "complete" and not (self.steps is not None and planned and self.steps < planned)

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the run's job (tokenizer, base_llama, encoder_id, feature_files, holdout, seed, ...)."""
        value = self.job.get(key)
        return default if value is None else value


class StepPointer(BaseModel):
    """The newest committed checkpoint of a run (`latest.json`) and the loss history up to it."""

    step: int
    path: str = Field(description="the step's folder, relative to the run's folder")
    history: list[dict[str, Any]] = Field(default_factory=list)


class Runs:
    """The training runs under one folder (`checkpoints/stage<N>/`): the one access point to their records.

    Args:
        ws: the workspace (or the filesystem) the folder is in.
        folder: the stage's folder, a path of `ws`.
    """

    def __init__(self, ws: Workspace, folder: str) -> None:
        self.ws, self.folder = ws, folder.rstrip("/")

    @classmethod
    def of_stage(cls, ws: Workspace, stage: int | str) -> Runs:
        """The runs of a training stage (or of `external`, for evaluations of foreign checkpoints)."""
        return cls(ws, ws.path("checkpoints", stage if isinstance(stage, str) else f"stage{stage}"))

    def run_folder(self, run_id: str) -> str:
        """A run's folder."""
        return posixpath.join(self.folder, run_id)

    def record(self, run_id: str) -> RunRecord | None:
        """A run's record, or None before it started."""
        rec = self._stored(run_id)
        if rec is None:
            return None
        job = self.ws.placed(rec.job, rec.relative)
        return rec.model_copy(update={"job": job | ({"workspace": self.ws.root} if "workspace" in job else {})})

    def _stored(self, run_id: str) -> RunRecord | None:
        """A run's record as stored: its job's workspace files relative (older records: full paths)."""
        doc = self._read(posixpath.join(self.run_folder(run_id), RUN_FILE))
        return None if doc is None else RunRecord.model_validate(doc)

    def start(self, run_id: str, job: dict[str, Any]) -> int:
        """Record a new attempt of a run as running; returns its number (1 for a new run)."""
        attempt = (self._stored(run_id) or RunRecord()).attempts + 1
        diverged = posixpath.join(self.run_folder(run_id), DIVERGED_FILE)
        if self.ws.exists(diverged):  # an earlier attempt's
            self.ws.remove(diverged)
        self._write_run(run_id, RunRecord(attempts=attempt, job=job))
        return attempt

    def finish(self, run_id: str, record: RunRecord, checkpoint: str) -> None:
        """Record how an attempt ended (`record.status`) with its final checkpoint (a location in the run's folder)."""
        body = record.model_copy(update={"checkpoint": run_relative(self.ws, self.run_folder(run_id), checkpoint)})
        self._write_run(run_id, body)

    def end(self, run_id: str, status: str) -> None:
        """Record that an attempt ended without finishing: `stopped` (interrupted) or `failed`."""
        rec = self.record(run_id) or RunRecord()
        self._write_run(run_id, rec.model_copy(update={"status": status}))

    def record_divergence(self, run_id: str, step: int, message: str) -> None:
        """Record where and why the running attempt diverged (`diverged.json`; a new attempt clears it)."""
        body = json.dumps({"step": step, "message": message}).encode()
        self.ws.write_bytes(posixpath.join(self.run_folder(run_id), DIVERGED_FILE), body)

    def divergence(self, run_id: str) -> dict[str, Any] | None:
        """The running attempt's divergence ({"step", "message"}), or None."""
        return self._read(posixpath.join(self.run_folder(run_id), DIVERGED_FILE))

    def latest(self, run_id: str) -> StepPointer | None:
        """The newest committed checkpoint of a run, its path a location of `ws`; None before the first."""
        doc = self._read(posixpath.join(self.run_folder(run_id), LATEST_FILE))
        if doc is None:
            return None
        pointer = StepPointer.model_validate(doc)
        return pointer.model_copy(update={"path": in_run(self.ws, self.run_folder(run_id), pointer.path)})

    def commit_step(self, run_id: str, step_folder: str, step: int, history: list[dict[str, Any]]) -> None:
        """Point the run at a checkpoint that has landed (a step folder of `ws` inside the run's folder)."""
        rel = run_relative(self.ws, self.run_folder(run_id), step_folder)
        self._write(
            posixpath.join(self.run_folder(run_id), LATEST_FILE), StepPointer(step=step, path=rel, history=history)
        )

    def checkpoint_of(self, run_id: str, model_dir: str = "model") -> str | None:
        """A run's checkpoint: its final one when it ended, else its newest step's `model_dir`; None before any."""
        rec = self.record(run_id)
        if rec is not None and rec.checkpoint:
            return in_run(self.ws, self.run_folder(run_id), rec.checkpoint)
        latest = self.latest(run_id)
        return posixpath.join(latest.path, model_dir) if latest else None

    def run_ids(self) -> list[str]:
        """Every run that has a record, oldest first (run ids start with their start time)."""
        return [
            posixpath.basename(posixpath.dirname(p)) for p in self.ws.glob(posixpath.join(self.folder, "*", RUN_FILE))
        ]

    def newest_complete(self) -> str | None:
        """The checkpoint of the newest complete run, a location of `ws`; None when no run completed."""
        for run_id in reversed(self.run_ids()):
            rec = self.record(run_id)
            if rec is not None and rec.finished and rec.checkpoint:
                return in_run(self.ws, self.run_folder(run_id), rec.checkpoint)
        return None

    def same_inputs(self, job: dict[str, Any]) -> tuple[str, str] | None:
        """(run id, status) of the newest run whose job equals `job` but for its run id, else None."""
        want = self.ws.portable(json.loads(json.dumps(job, default=str)))[0] | _ANY_RUN
        for run_id in reversed(self.run_ids()):
            rec = self._stored(run_id)
            if rec is None:
                continue
            # the stored job is already in the relative form; an older record's full paths are found here first
            stored = rec.job if rec.relative is not None else self.ws.portable(self.ws.placed(rec.job, None))[0]
            if stored | _ANY_RUN == want:
                return run_id, rec.status
        return None

    def _write_run(self, run_id: str, rec: RunRecord) -> None:
        """Write a run's record, its job's workspace files relative to the root (and the root itself as `.`)."""
        job, relative = self.ws.portable(rec.job)
        job = job | ({"workspace": "."} if "workspace" in job else {})
        self._write(
            posixpath.join(self.run_folder(run_id), RUN_FILE), rec.model_copy(update={"job": job, "relative": relative})
        )

    def record_evaluation(self, run_id: str, stamp: str, body: bytes) -> str:
        """Write one evaluation's record beside the run; returns its path."""
        path = posixpath.join(self.run_folder(run_id), EVALUATIONS, f"{stamp}.json")
        self.ws.write_bytes(path, body)
        return path

    def _read(self, path: str) -> dict[str, Any] | None:
        return json.loads(self.ws.read_bytes(path)) if self.ws.exists(path) else None

    def _write(self, path: str, doc: BaseModel) -> None:
        self.ws.write_bytes(path, json.dumps(doc.model_dump(mode="json"), indent=1).encode())


def run_of(ws: Workspace, metadata: dict[str, Any]) -> RunRecord | None:
    """The record of the run that wrote a checkpoint, from the stage and run id in the checkpoint's own metadata;
    None for a checkpoint no run of this workspace made."""
    stage, run_id = metadata.get("stage"), metadata.get("run_id")
    if not stage or not run_id:
        return None
    return Runs.of_stage(ws, int(stage)).record(str(run_id))


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
