"""Where the loop runs: the Session it needs, in one local process or as a Ray Train worker, committing each
checkpoint to the run's folder."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

import torch
from torch import nn

from pipelines import assets
from pipelines.train.job import Job
from pipelines.train.parallel import shard_model
from stores.runs import PROGRESS_FILE, Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)


class Session(Protocol):
    """What the loop needs from its runtime (Ray Train, or one local process)."""

    rank: int
    world: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train with: itself, DDP around it, or itself sharded in place by `shard_model` (FSDP).

        It gets the model on the CPU; DDP and FSDP move it to `device`, anything else is moved there after.
        """
        ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int, history: list | None = None
    ) -> None: ...

    def resume_dir(self) -> str | None: ...

    def progress(self, line: str) -> None:
        """Rank 0's progress line, at most once per interval: where the driver of the run can show it."""
        ...


class _Pointer:
    """Writes `latest.json` (the newest committed checkpoint and the loss history) after a checkpoint lands."""

    def __init__(self, ws: Workspace, job: Job) -> None:
        self.ws, self.job = ws, job

    def commit(self, path: str, step: int, history: list) -> None:
        """Record the checkpoint at `path` (a step folder in the run's folder)."""
        Runs.of_stage(self.ws, self.job.stage).commit_step(self.job.run_id, path, step, history)


class LocalSession:
    """One worker in this process, without Ray: checkpoints are uploaded to the run's `local/` folder."""

    rank, world = 0, 1

    def __init__(self, ws: Workspace, job: Job, resume: str | None) -> None:
        self.ws, self.job, self._resume = ws, job, resume
        self.device = torch.device("cuda" if job.settings.use_gpu and torch.cuda.is_available() else "cpu")
        self.pointer = _Pointer(ws, job)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.job.settings.parallel == "fsdp":
            log.info("parallel: fsdp is ignored by a local run (one worker: nothing to shard)")
        return model

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int, history: list | None = None
    ) -> None:
        if checkpoint_dir:
            target = self.ws.checkpoints(f"stage{self.job.stage}", self.job.run_id, "local", f"step-{step:08d}")
            self.ws.upload_dir(checkpoint_dir, target)
            self.pointer.commit(target, step, history or [])

    def resume_dir(self) -> str | None:
        return assets.local_copy(self.ws, self._resume) if self._resume else None

    def progress(self, line: str) -> None:
        pass  # the loop's own log line is on this process's console


class RaySession:
    """A Ray Train worker: DDP or FSDP over the workers, checkpoints reported to Ray Train's storage (the run's
    folder, under the attempt's Ray run)."""

    def __init__(self, ws: Workspace, job: Job, resume: str | None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.ws, self.job, self.pointer, self._resume = ws, job, _Pointer(ws, job), resume

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world == 1:
            if self.job.settings.parallel == "fsdp":
                log.info("parallel: fsdp is ignored with one worker (nothing to shard)")
            return model
        if self.job.settings.parallel == "fsdp":
            if self.rank == 0:
                log.info(
                    "parallel: fsdp, each decoder layer and the rest of the model sharded over %d workers", self.world
                )
            return shard_model(model, self.device, self.world)  # type: ignore[arg-type]
        return ray.train.torch.prepare_model(model, move_to_device=True)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int, history: list | None = None
    ) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        name = f"step-{step:08d}"
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if self.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        if self.rank == 0:  # report returned: the checkpoint is in storage, under the Ray run of this attempt
            attempt = ray.train.get_context().get_experiment_name()
            target = self.ws.checkpoints(f"stage{self.job.stage}", self.job.run_id, attempt, name)
            self.pointer.commit(target, step, history or [])

    def resume_dir(self) -> str | None:
        """A checkpoint Ray restored after a worker failure in this fit, else the one this attempt resumes from."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        path = checkpoint.path if checkpoint is not None else self._resume
        return assets.local_copy(self.ws, path) if path else None

    def progress(self, line: str) -> None:
        """Ray keeps a worker's logs to itself: the line goes into the run's folder, where the driver reads it."""
        path = self.ws.checkpoints(f"stage{self.job.stage}", self.job.run_id, PROGRESS_FILE)
        self.ws.write_bytes(path, json.dumps({"line": line, "time": time.time()}).encode())
