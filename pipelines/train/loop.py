"""The training loop of every worker: it sequences each step (accumulate, clip, step, report, checkpoint) over the
components beside it; the loss of a step is the exact token mean over the global batch."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from model.llm.model import ImageBindLLM
from model.llm.phases import phase_parameters, set_phase
from pipelines import stop
from pipelines.console import Progress
from pipelines.train.compute import Compute, prepare_compute
from pipelines.train.data import Micro
from pipelines.train.guard import Guard
from pipelines.train.metrics import Recorder, peak_memory_mb
from pipelines.train.parallel import grad_sync, is_sharded
from pipelines.train.schedule import Hyper, adamw, set_lr
from pipelines.train.session import Session
from pipelines.train.state import LoopState, load_progress, load_weights, save_state

log = logging.getLogger(__name__)

REPORT_EVERY = 20  # steps between metric reports between checkpoints (progress lines: every interval)


@dataclass
class StepLog:
    """One step as the history records it."""

    step: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    grad_norm: float | None = None  # before clipping
    samples: int | None = None


@dataclass
class _Parts:
    """What the loop steps: the prepared model, the parameters it trains, their optimizer, where the loop is."""

    wrapped: nn.Module
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    state: LoopState
    autocast: bool


def train(
    session: Session,
    model: ImageBindLLM,
    phase: str,
    batches: Callable[[int], Any],
    hyper: Hyper,
    checkpoint_every: int,
    max_steps: int | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    metadata: dict[str, Any] | None = None,
    compute: Compute | None = None,
    save: bool = True,
    recorder: Recorder | None = None,
    guard: Guard | None = None,
) -> LoopState:
    """Run steps until `hyper.total_steps` (or `max_steps`), checkpointing every `checkpoint_every` and at the end
    (never when not `save`: benchmarks).

    The loss of a step is the token mean over the whole global batch (every worker's micro-batches): each
    micro-batch's summed loss (`ImageBindLLM.forward(sum_loss=True)`: no logits of the whole batch) is divided by
    the global count of answer tokens, so 1 worker and N workers with the same global batch compute the same
    gradient. Autocast runs in bfloat16 on CUDA, and wherever the frozen base is bfloat16 (`compute`).

    `recorder` (rank 0) keeps every step's metrics in the run's history, flushed before each checkpoint; `guard`
    stops the run (Diverged) at a step whose loss or gradient must not be applied, before the optimizer steps, so
    the newest checkpoint stays the last good one.
    """
    run = _start(session, model, phase, hyper, compute or Compute())
    state, end = run.state, min(hyper.total_steps, max_steps or hyper.total_steps)
    progress = Progress(log, f"stage {(metadata or {}).get('stage', '?')}", start_at=state.step)
    first = state.step + 1  # its line says the run is under way
    stream = batches(state.step)
    if recorder:
        recorder.starting_at(state.step)
    if guard:
        guard.seen([h["loss"] for h in state.history])
    try:
        while state.step < end:
            stop.check()  # Ctrl-C: between steps, the newest checkpoint is where --resume goes on
            start = time.perf_counter()
            micros = next(stream)
            lr = set_lr(run.optimizer, state.step, hyper)
            tokens, total = _accumulate(session, run, micros)
            loss = float(session.all_reduce(total.reshape(1))[0] / tokens.clamp(min=1)[0])
            grad_norm = _clip(run, hyper.clip_grad)
            samples = sum(len(m.input_ids) for m in micros) * session.world
            entry = StepLog(state.step + 1, loss, lr, int(tokens[0]), 0.0, grad_norm, samples)
            if guard:
                guard.check(entry.step, loss, grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            entry.seconds = time.perf_counter() - start
            logged = asdict(entry)
            state.history.append(logged)
            if recorder:
                recorder.add(**_row(logged, session.device))
            if on_step:
                on_step(entry)
            metrics = {"step": state.step, "loss": loss, "lr": lr, "tokens": entry.tokens, "grad_norm": grad_norm}
            if save and (state.step % checkpoint_every == 0 or state.step == end):
                if recorder:
                    recorder.flush()  # a committed checkpoint's steps are all in the history
                _checkpoint(session, model, run, metrics, metadata)
            elif state.step % REPORT_EVERY == 0:  # a Ray report synchronises the workers: not every step
                session.report(metrics, None, state.step)
            if session.rank == 0 and (progress.due() or state.step in (first, end)):
                detail = f"steps, loss {loss:.4f}, lr {lr:.3g}, {entry.tokens / max(entry.seconds, 1e-9):.0f} tokens/s"
                session.progress(progress.update(state.step, end, detail, force=True) or "")
    finally:
        if recorder:
            recorder.flush()  # steps after the newest checkpoint too: a resume from it forgets them
    return state


def _row(logged: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A step's row of the metric history: its StepLog, with rates and peak memory."""
    seconds = max(logged["seconds"], 1e-9)
    return logged | {
        "step_seconds": logged["seconds"],
        "tokens_per_s": logged["tokens"] / seconds,
        "samples_per_s": (logged["samples"] or 0) / seconds,
        "peak_memory_mb": peak_memory_mb(device),
    }


def _start(session: Session, model: ImageBindLLM, phase: str, hyper: Hyper, compute: Compute) -> _Parts:
    """The model in `phase` (with the resumed weights), computing as `compute` says, prepared by the session; its
    optimizer and the loop's state (both resumed, with the RNG states, when the session resumes)."""
    set_phase(model, phase)
    resume = session.resume_dir()
    if resume:
        load_weights(resume, model)
    dtype = prepare_compute(model, compute, session.device)
    wrapped = session.prepare(model)
    if not is_sharded(wrapped):
        model.to(session.device)
    # built after sharding: FSDP replaced the parameters by sharded ones, and the optimizer owns those
    trainable = phase_parameters(model, phase)
    optimizer = adamw(trainable, hyper)
    state = LoopState()
    if resume:
        state = load_progress(resume, optimizer)
        log.info("resumed at step %d from %s", state.step, resume)
    autocast = session.device.type == "cuda" or dtype == torch.bfloat16
    return _Parts(wrapped, list(trainable.values()), optimizer, state, autocast)


def _accumulate(session: Session, run: _Parts, micros: list[Micro]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this worker's micro-batches of a step: (the global count of answer tokens, (1,);
    the summed loss of this worker's micro-batches, a scalar)."""
    device = session.device
    tokens = session.all_reduce(torch.tensor([float(sum(m.tokens for m in micros))], device=device))
    total = torch.zeros((), device=device)
    for i, m in enumerate(micros):
        sync = grad_sync(run.wrapped, last=i == len(micros) - 1)
        with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.autocast):
            ids, labels = m.input_ids.to(device), m.labels.to(device)
            loss_sum = run.wrapped(ids, m.features.to(device), labels=labels, sum_loss=True).loss
        (loss_sum * session.world / tokens.clamp(min=1)).backward()
        total += loss_sum.detach()
    return tokens, total


def _clip(run: _Parts, clip_grad: float | None) -> float:
    """The gradient's norm over every trained tensor (DTensor shards too) before clipping; clipped to `clip_grad`."""
    return float(torch.nn.utils.clip_grad_norm_(run.trainable, clip_grad or math.inf))


def _checkpoint(
    session: Session, model: ImageBindLLM, run: _Parts, metrics: dict[str, Any], metadata: dict[str, Any] | None
) -> None:
    """Save a checkpoint into a temporary folder of rank 0 and report it (the session keeps it)."""
    tmp = tempfile.mkdtemp(prefix="ibllm-ckpt-") if session.rank == 0 else None
    try:
        if tmp or is_sharded(model):  # FSDP: every rank takes part in gathering what rank 0 writes
            save_state(tmp, model, run.optimizer, run.state, metadata)
        session.report(metrics, tmp, run.state.step, run.state.history)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
