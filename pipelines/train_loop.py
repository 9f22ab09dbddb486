"""The training loop of every worker: exact token-mean loss over the global batch, AdamW, warm-up + cosine, resume."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from model.llm import IGNORE, ImageBindLLM
from model.llm_checkpoint import load_tensors, read_checkpoint, save_checkpoint
from model.llm_phases import decay_groups, set_phase

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_DIR = "model"


@dataclass
class Hyper:
    """Optimisation settings of one stage (see pipelines.config.StageConfig)."""

    lr: float
    min_lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    clip_grad: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)


def lr_at(step: int, h: Hyper) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then a half-cycle cosine down to `min_lr` (per iteration)."""
    if step < h.warmup_steps:
        return h.lr * step / h.warmup_steps
    span = max(1, h.total_steps - h.warmup_steps)
    return h.min_lr + (h.lr - h.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - h.warmup_steps) / span))


class Session(Protocol):
    """What the loop needs from its runtime (Ray Train, or one local process)."""

    rank: int
    world: int
    device: torch.device

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def report(
        self, metrics: dict[str, Any], checkpoint_dir: str | None, step: int, history: list | None = None
    ) -> None: ...

    def resume_dir(self) -> str | None: ...


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    tokens: int
    seconds: float


@dataclass
class LoopState:
    """What a checkpoint carries besides the weights."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}  # fmt: skip


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


def save_state(directory: str, model: ImageBindLLM, optimizer: torch.optim.Optimizer, state: LoopState) -> None:
    """A training checkpoint: our model checkpoint + optimizer, step, history and RNG states (tensors only)."""
    save_checkpoint(model, os.path.join(directory, MODEL_DIR), {"step": state.step})
    blob = {"step": state.step, "optimizer": optimizer.state_dict(), "rng": _rng_state(),
            "history": json.dumps(state.history)}  # fmt: skip
    torch.save(blob, os.path.join(directory, STATE_FILE))


def load_state(directory: str, model: ImageBindLLM, optimizer: torch.optim.Optimizer) -> LoopState:
    """Restore what `save_state` wrote (weights-only reads)."""
    _, tensors, _ = read_checkpoint(os.path.join(directory, MODEL_DIR))
    load_tensors(model, tensors, directory)
    blob = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    _set_rng_state(blob["rng"])
    return LoopState(step=int(blob["step"]), history=json.loads(blob["history"]))


def masked_sum_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropy over answer tokens, to be divided by the global count."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )  # fmt: skip


def train(
    session: Session,
    model: ImageBindLLM,
    phase: str,
    batches: Callable[[int], Any],
    hyper: Hyper,
    checkpoint_every: int,
    max_steps: int | None = None,
    on_step: Callable[[StepLog], None] | None = None,
) -> LoopState:
    """Run steps until `hyper.total_steps` (or `max_steps`), checkpointing every `checkpoint_every` and at the end.

    The loss of a step is the token mean over the whole global batch (every worker's micro-batches): each
    micro-batch's summed loss is divided by the global count of answer tokens, so 1 worker and N workers with
    the same global batch compute the same gradient.
    """
    trainable = set_phase(model, phase)
    model.to(session.device)
    optimizer = torch.optim.AdamW(decay_groups(trainable, hyper.weight_decay), lr=hyper.lr, betas=hyper.betas)
    state = LoopState()
    if resume := session.resume_dir():
        state = load_state(resume, model, optimizer)
        log.info("resumed at step %d from %s", state.step, resume)
    wrapped = session.prepare(model)
    end = min(hyper.total_steps, max_steps or hyper.total_steps)
    autocast = session.device.type == "cuda"
    stream = batches(state.step)
    while state.step < end:
        start = time.perf_counter()
        micros = next(stream)
        lr = lr_at(state.step, hyper)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = session.all_reduce(torch.tensor([float(sum(m.tokens for m in micros))], device=session.device))
        total = torch.zeros((), device=session.device)
        for i, m in enumerate(micros):
            sync = i == len(micros) - 1
            ctx = wrapped.no_sync() if (not sync and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
            with ctx, torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=autocast):
                out = wrapped(m.input_ids.to(session.device), m.features.to(session.device))
                loss_sum = masked_sum_loss(out.logits, m.labels.to(session.device))
            (loss_sum * session.world / tokens.clamp(min=1)).backward()
            total += loss_sum.detach()
        if hyper.clip_grad:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), hyper.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(session.all_reduce(total.reshape(1))[0] / tokens.clamp(min=1)[0])
        state.step += 1
        entry = StepLog(state.step, loss, lr, int(tokens[0]), time.perf_counter() - start)
        state.history.append(asdict(entry))
        if on_step:
            on_step(entry)
        metrics = {"step": state.step, "loss": loss, "lr": lr, "tokens": entry.tokens}
        if state.step % checkpoint_every == 0 or state.step == end:
            _checkpoint(session, model, optimizer, state, metrics)
        else:
            session.report(metrics, None, state.step)
    return state


def _checkpoint(session: Session, model: ImageBindLLM, optimizer: torch.optim.Optimizer, state: LoopState,
                metrics: dict[str, Any]) -> None:  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="ibllm-ckpt-") if session.rank == 0 else None
    try:
        if tmp:
            save_state(tmp, model, optimizer, state)
        session.report(metrics, tmp, state.step, state.history)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
