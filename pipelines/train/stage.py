"""Train stage 1 or 2 on cached features with Ray Train (1..N workers), checkpointing into the workspace."""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import secrets
import threading
import time
from dataclasses import replace
from typing import Any

import torch
from pydantic import BaseModel

from model.llm.phases import STAGE_PHASE
from pipelines import stop
from pipelines.config import Config, StageConfig
from pipelines.console import interval, polling
from pipelines.errors import Diverged, InputError, RunDiverged
from pipelines.train.compute import Compute
from pipelines.train.guard import Guard
from pipelines.train.job import Job
from pipelines.train.loop import train
from pipelines.train.metrics import Recorder
from pipelines.train.session import LocalSession, RaySession
from pipelines.train.setup import build_batches, build_model, resolve_job
from pipelines.train.state import MODEL_DIR
from stores.lease import lease
from stores.runs import PROGRESS_FILE, REPORT_FILE, RunRecord, Runs
from stores.workspace import Workspace

log = logging.getLogger(__name__)


class TrainResult(BaseModel):
    """One training run: where its checkpoint is and how the loss went."""

    stage: int
    run_id: str
    steps: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None
    checkpoint: str
    workers: int
    resumed_from: int | None
    losses: list[float]
    seconds: float
    status: str = "complete"  # complete (every planned step) or stopped (--max-steps: not chosen by default)
    report: str | None = None  # the run's report (curves, settings), written when it ended

    def summary(self) -> str:
        resumed = f", resumed at step {self.resumed_from}" if self.resumed_from else ""
        text = (
            f"stage {self.stage} run {self.run_id}: {self.steps}/{self.total_steps} steps on {self.workers} "
            f"worker(s){resumed}, loss {self.first_loss:.4f} -> {self.final_loss:.4f}; checkpoint "
            f"{self.checkpoint}"
        )
        if self.status == "stopped":
            text += (
                f"\nstopped at step {self.steps} of {self.total_steps}: not used by default until complete; "
                f"`ibllm train --stage {self.stage} --resume` continues it"
            )
        return text


def stage_config(cfg: Config, stage: int) -> StageConfig:
    if stage not in STAGE_PHASE:
        raise InputError(f"--stage {stage}: choose 1 (bind network, gates, prefix) or 2 (LoRA, biases, norms)")
    return getattr(cfg.train, f"stage{stage}")


def run(
    cfg: Config,
    stage: int,
    resume: bool = False,
    local: bool = False,
    max_steps: int | None = None,
    reuse: bool = False,
    init: str | None = None,
) -> TrainResult:
    """Train `stage`; `resume` continues the newest unfinished (or finished) run of the stage from its last checkpoint.

    `local` runs the one worker in this process without Ray (quick checks on a laptop); otherwise Ray Train's
    TorchTrainer runs `train.stageN.workers` workers (gloo on CPU, nccl on GPUs). `reuse` returns the newest
    complete run made from exactly the same inputs and settings instead of training again. Stage 2 starts from
    `init` (a stage-1 checkpoint), by default the newest complete stage-1 run's.
    """
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    sc = stage_config(cfg, stage)
    runs = Runs.of_stage(ws, stage)
    run_id = (runs.run_ids() or [None])[-1] if resume else None
    if resume and run_id is None:
        log.warning("no earlier stage %d run to resume: starting a new one", stage)
    elif resume and runs.latest(run_id) is None:
        log.warning("stage %d run %s has no checkpoint yet: it starts again at step 0", stage, run_id)
    run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    job = resolve_job(cfg, ws, stage, run_id, max_steps, init=init)
    if reuse and not resume:
        same = runs.same_inputs(job.record())
        if same is not None and same[1] == "complete":
            log.info("stage %d: run %s was made from the same inputs and settings; reusing it", stage, same[0])
            return _result(ws, replace(job, run_id=same[0]), sc.workers, None, 0.0)
        if same is not None:
            log.info("stage %d: continuing the unfinished run %s of the same inputs and settings", stage, same[0])
            run_id, job = same[0], replace(job, run_id=same[0])
    with lease(ws, "train", f"stage{stage}.{run_id}"):  # a run continued by two commands at once is refused
        try:
            result = _attempt(cfg, ws, job, local, start)
        except BaseException:
            if runs.record(run_id) is not None:
                _report(ws, job)
            raise
        result.report = _report(ws, job)
        return result


def _attempt(cfg: Config, ws: Workspace, job: Job, local: bool, start: float) -> TrainResult:
    """One attempt of a run (its record says how many came before), under the run's lease."""
    stage, run_id, runs, sc = job.stage, job.run_id, Runs.of_stage(ws, job.stage), job.settings
    latest = runs.latest(run_id)
    resumed_from = latest.step if latest else None
    resume = latest.path if latest else None
    attempt = runs.start(run_id, job.record())
    log.info(
        "stage %d run %s (attempt %d): %d steps, %d examples per step, %d worker(s)%s",
        stage,
        run_id,
        attempt,
        job.total_steps,
        sc.global_batch_size,
        1 if local else sc.workers,
        f", resuming at step {resumed_from}" if resumed_from else "",
    )
    try:
        with stop.note(lambda: resume_note(ws, job)):
            if local:
                worker_main({"job": job, "session": "local", "resume": resume})
            else:
                _fit_with_ray(cfg, job, attempt, resume)
            stop.check()  # Ray Train aborts a run on Ctrl-C and returns: the run stopped, it did not end
    except BaseException as e:  # the record says how the attempt ended: never `running` after it ended
        diverged = runs.divergence(run_id)  # a worker's Diverged, however Ray Train wrapped it
        if diverged is not None:
            runs.end(run_id, "diverged")
            said = f"stage {stage} run {run_id} {diverged['message']}"
            raise RunDiverged(diverged["step"], said, diverged_note(ws, job)) from None
        runs.end(run_id, "stopped" if isinstance(e, KeyboardInterrupt) or stop.requested() else "failed")
        raise
    result = _result(ws, job, 1 if local else sc.workers, resumed_from, time.perf_counter() - start)
    if result is None:
        raise RuntimeError(f"stage {stage} run {run_id} ended without a checkpoint")
    status = "complete" if result.steps >= job.total_steps else "stopped"  # --max-steps: stopped, never a default
    result.status = status
    runs.finish(
        run_id,
        RunRecord(status=status, attempts=attempt, job=job.record(), steps=result.steps, final_loss=result.final_loss),
        result.checkpoint,
    )
    return result


def _report(ws: Workspace, job: Job) -> str | None:
    """Write the run's report (`report.html` in its folder) once its record says how the attempt ended, however it
    ended (a report that cannot be written is a warning: it never hides how the run ended)."""
    try:
        from pipelines.runs.report import write_run_report

        written = write_run_report(ws, job.stage, job.run_id)
    except Exception as e:
        log.warning("stage %d run %s: no report written (%s: %s)", job.stage, job.run_id, type(e).__name__, e)
        return None
    log.info("stage %d run %s: report %s", job.stage, job.run_id, written)
    return written


def diverged_note(ws: Workspace, job: Job) -> str:
    """What a diverged run keeps and how to go on."""
    latest = Runs.of_stage(ws, job.stage).latest(job.run_id)
    resume = f"`ibllm train --stage {job.stage} --resume`"
    lower = f"--set train.stage{job.stage}.blr=<lower>"
    if latest is None:
        return f"no checkpoint was taken before it; a new run with a lower learning rate ({lower}) starts again"
    return (
        f"its newest checkpoint, step {latest.step}, is the last good one: {resume} goes on from it "
        f"(with a lower learning rate: {lower})"
    )


def resume_note(ws: Workspace, job: Job) -> str:
    """What an interrupted run keeps and how to continue it."""
    latest = Runs.of_stage(ws, job.stage).latest(job.run_id)
    resume = f"`ibllm train --stage {job.stage} --resume`"
    if latest is None:
        return f"stage {job.stage} run {job.run_id} stopped before its first checkpoint; {resume} starts it again"
    return f"stage {job.stage} run {job.run_id} stopped; {resume} continues from step {latest.step}"


def _result(ws: Workspace, job: Job, workers: int, resumed_from: int | None, seconds: float) -> TrainResult | None:
    """The run's result from its `latest.json` (None before its first checkpoint)."""
    latest = Runs.of_stage(ws, job.stage).latest(job.run_id)
    if not latest:
        return None
    losses = [h["loss"] for h in latest.history]
    return TrainResult(
        stage=job.stage,
        run_id=job.run_id,
        steps=latest.step,
        total_steps=job.total_steps,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        checkpoint=posixpath.join(latest.path, MODEL_DIR),
        workers=workers,
        resumed_from=resumed_from,
        losses=losses,
        seconds=seconds,
        report=_report_of(ws, job),
    )


def _report_of(ws: Workspace, job: Job) -> str | None:
    """The run's report when one was written (a reused run's)."""
    path = posixpath.join(Runs.of_stage(ws, job.stage).run_folder(job.run_id), REPORT_FILE)
    return ws.as_url(path) if ws.exists(path) else None


def _fit_with_ray(cfg: Config, job: Job, attempt: int, resume: str | None) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import connect

    connect(cfg)
    ws, sc = Workspace(cfg.workspace, cfg.storage_options), job.settings
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={"job": job, "session": "ray", "resume": resume},
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=sc.workers,
            use_gpu=sc.use_gpu,
            placement_strategy=sc.placement,
            resources_per_worker=_worker_resources(sc) if sc.worker_resources else None,
        ),
        run_config=RunConfig(
            name=f"attempt-{attempt}", failure_config=FailureConfig(max_failures=0), **_run_storage(ws, job)
        ),
    )
    waiting = f"stage {job.stage}: Ray Train is starting {sc.workers} worker(s)"
    with relay_progress(ws, ws.checkpoints(f"stage{job.stage}", job.run_id, PROGRESS_FILE), waiting=waiting):
        _fit_until_stopped(trainer)


def _fit_until_stopped(trainer: Any) -> None:
    """`trainer.fit()` in a thread of its own, the main thread checking for a stop (Ctrl-C) meanwhile.

    In the main thread Ray Train would install a SIGINT handler of its own, which ends the process from inside the
    handler (exit 1, nothing said). Stopped here, the run's workers end with this driver; its committed checkpoints
    are kept, and --resume goes on from the newest.
    """
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the main thread
            failed.append(e)

    thread = threading.Thread(target=fit, name="ibllm-ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        stop.check()
    if failed:
        raise failed[0]


def _run_storage(ws: Workspace, job: Job) -> dict[str, Any]:
    """Where Ray Train keeps the run's own state: the run's folder, through the workspace's filesystem on object
    storage (Ray's own S3 client would not have the workspace's endpoint and credentials)."""
    path = ws.checkpoints(f"stage{job.stage}", job.run_id)
    if ws.is_local:
        return {"storage_path": path}
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return {"storage_path": path, "storage_filesystem": PyFileSystem(FSSpecHandler(ws.fs))}


def _worker_resources(sc: StageConfig) -> dict[str, float]:
    """What each worker asks of Ray: Ray Train's default (1 CPU, or 1 GPU) plus the configured custom resources."""
    return ({"GPU": 1} if sc.use_gpu else {"CPU": 1}) | sc.worker_resources


def relay_progress(
    ws: Workspace, path: str, poll: float = 2.0, waiting: str | None = None
) -> contextlib.AbstractContextManager[None]:
    """While the block runs, log each new progress line the run's rank-0 worker writes to `path` (and `waiting`
    once, when the first line is an interval late: workers take a while to start)."""
    start = time.time()
    seen = {"time": start, "lines": 0}  # a line of an earlier attempt is not news

    def relay() -> None:
        doc = json.loads(ws.read_bytes(path)) if ws.exists(path) else None
        if doc and doc.get("time", 0) > seen["time"]:
            seen["time"], seen["lines"] = doc["time"], seen["lines"] + 1
            log.info("%s", doc["line"])
        elif waiting and seen["lines"] == 0 and time.time() - start >= interval():
            seen["lines"] = -1  # said once
            log.info("%s", waiting)

    return polling(relay, poll)


def worker_main(config: dict[str, Any]) -> None:
    """One training worker (a Ray Train worker, or this process with `session: local`): `config` holds the `job`,
    the `session` kind and the checkpoint to `resume` from."""
    job: Job = config["job"]
    ws = Workspace(job.workspace, job.storage_options)
    torch.manual_seed(job.seed)
    session = (RaySession if config["session"] == "ray" else LocalSession)(ws, job, config.get("resume"))
    model = build_model(job)
    batches = build_batches(job, ws, session.rank, session.world)
    made_by, relative = ws.portable(
        {"encoder_id": job.encoder_id, "seed": job.seed, "base_llama": job.base_llama, "tokenizer": job.tokenizer}
    )
    metadata = {"stage": job.stage, "run_id": job.run_id, **made_by, "relative": relative}
    phase, every, compute = STAGE_PHASE[job.stage], job.settings.checkpoint_every_steps, Compute.of(job.train)
    recorder = Recorder.of_job(ws, job) if session.rank == 0 else None
    try:
        train(
            session,
            model,
            phase,
            batches,
            job.hyper,
            every,
            job.max_steps,
            metadata=metadata,
            compute=compute,
            recorder=recorder,
            guard=Guard(job.train.max_loss_ratio),
        )
    except Diverged as e:  # every rank stops at the step; rank 0 says where, for the driver
        if session.rank == 0:
            Runs.of_stage(ws, job.stage).record_divergence(job.run_id, e.step, str(e))
        raise
