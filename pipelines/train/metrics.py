"""Rank 0's record of every step into the run's metric history, flushed in segments (`stores.metrics`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from pipelines.train.job import Job
from stores.metrics import MetricLog
from stores.runs import Runs
from stores.workspace import Workspace

FLUSH_SECONDS = 30.0  # a segment at least this often (and at every checkpoint): what a watcher sees is this fresh


class Recorder:
    """Collects each step's metrics and writes them as a segment at every checkpoint (before it is committed, so a
    committed checkpoint's steps are all in the history) and every FLUSH_SECONDS between.

    On a resumed attempt it first (`starting_at`) forgets the steps logged after the checkpoint it resumes from:
    they are trained again, and the history keeps one row a step.
    """

    def __init__(self, ws: Workspace, stage: int, run_id: str, attempt: int) -> None:
        self.stage, self.run_id, self.attempt = stage, run_id, attempt
        self.log = MetricLog(ws, Runs.of_stage(ws, stage).run_folder(run_id))
        self.rows: list[dict[str, Any]] = []
        self.flushed = time.monotonic()

    @classmethod
    def of_job(cls, ws: Workspace, job: Job) -> Recorder:
        """The recorder of a run's running attempt (its number from the run's record)."""
        record = Runs.of_stage(ws, job.stage).record(job.run_id)
        return cls(ws, job.stage, job.run_id, record.attempts if record else 1)

    def starting_at(self, step: int) -> None:
        """The loop starts after `step` (0, or the checkpoint it resumes from): later logged steps are forgotten."""
        self.log.keep_until(step)

    def add(self, **metrics: Any) -> None:
        """One logged step (its `step` and any of the history's columns)."""
        self.rows.append({"stage": self.stage, "run_id": self.run_id, "attempt": self.attempt, "time": time.time()})
        self.rows[-1].update(metrics)
        if time.monotonic() - self.flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the steps not yet written as one segment."""
        self.log.write(self.rows)
        self.rows, self.flushed = [], time.monotonic()


def peak_memory_mb(device: torch.device) -> float | None:
    """The device's peak allocated memory so far (CUDA), in MiB; None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
