"""The files of a training run's folder (`checkpoints/stage<N>/<run_id>/`): its record and its newest checkpoint."""

from __future__ import annotations

RUN_FILE = "run.json"  # the run's record: status, attempts, job, final checkpoint (written by the driver)
LATEST_FILE = "latest.json"  # the newest committed checkpoint and the loss history (written after each checkpoint)
PROGRESS_FILE = "progress.json"  # rank 0's newest progress line, for the driver's console (written every interval)
