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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from model.llm.checkpoint import load_tensors, read_checkpoint, write_checkpoint
from model.llm.model import IGNORE, LOSS_CHUNK, ImageBindLLM
from model.llm.phases import decay_groups, phase_parameters, set_phase
from model.weights import load_weights_only
from pipelines.console import Progress
from pipelines.errors import InputError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_DIR = "model"
REPORT_EVERY = 20  # steps between metric reports between checkpoints (progress lines: every interval)


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


@dataclass
class Compute:
    """How the steps compute (pipelines.config.TrainConfig): the same losses and gradients up to rounding."""

    base_dtype: str = "auto"  # the frozen base's dtype: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16
    fused_kernels: str = "auto"  # auto: Liger-Kernel's fused linear cross-entropy where importable on CUDA; off
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    loss_chunk: int = LOSS_CHUNK  # rows of logits at a time in the summed loss


def base_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype for a `Compute.base_dtype` setting on `device`."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in ("float32", "bfloat16"):
        raise InputError(f"train.base_dtype {setting!r}: choose auto, float32 or bfloat16")
    return getattr(torch, setting)


def cast_frozen_base(model: ImageBindLLM, dtype: torch.dtype) -> int:
    """Cast the floating parameters no phase trains (the LLaMA's projections, head, k/v biases) to `dtype`;
    returns how many. Checkpoint tensors (bind network, prefix, gates, LoRA, norms, tuned biases) keep their
    dtype, trained or frozen in this phase: a stage passes the other stage's tensors on unchanged, and the trained
    ones stay float32 (`set_phase`). The token embeddings keep theirs too: they set the dtype of the residual
    stream and of RoPE's cos/sin, so with them in float32 a bfloat16 base under autocast computes what a float32
    base under autocast computes (autocast casts the weights of every matmul to bfloat16 anyway; a test checks
    it). Buffers (RoPE frequencies) are left alone.
    """
    keep = {id(p) for p in phase_parameters(model).values()} | {id(model.base.model.embed_tokens.weight)}
    cast = 0
    for p in model.parameters():
        if id(p) not in keep and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def fused_cross_entropy(setting: str, device: torch.device) -> Callable[..., torch.Tensor] | None:
    """Liger-Kernel's fused linear cross-entropy (summed, IGNORE skipped) when `setting` is auto, the device is
    CUDA and `liger_kernel` imports (the `gpu-train` extra); None otherwise: our chunked loss is used."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting != "auto":
        raise InputError(f"train.fused_kernels {setting!r}: choose auto or off")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        log.info("fused_kernels auto: liger_kernel is not importable (%s); the chunked cross-entropy is used", e)
        return None
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    problem = _fused_loss_problem(fused, device)
    if problem:
        log.warning("fused_kernels auto: Liger-Kernel's fused cross-entropy %s; the chunked cross-entropy is used",
                    problem)  # fmt: skip
        return None
    return fused


def _fused_loss_problem(fused: Callable[..., torch.Tensor], device: torch.device) -> str | None:
    """None when `fused` gives the summed, IGNORE-skipping cross-entropy (and its gradient) on a small bf16 case;
    else what went wrong: a version that averages, or any error, must not train with a wrong loss."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    weight = (0.1 * torch.randn(96, 64, generator=g)).to(device, torch.bfloat16)
    targets = torch.tensor([3, IGNORE, 7, 95, IGNORE, 0], device=device)
    want = nn.functional.cross_entropy(rows.float() @ weight.float().T, targets, ignore_index=IGNORE, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, rows)
    try:
        got = fused(weight, rows, targets, None)
        (grad,) = torch.autograd.grad(got, rows)
    except Exception as e:  # a kernel that does not build or run here
        return f"failed a check ({type(e).__name__}: {e})"
    if not torch.allclose(got.float(), want, rtol=0.02) or not torch.allclose(grad.float(), want_grad.float(),
                                                                               rtol=0.05, atol=1e-2):  # fmt: skip
        return f"does not give the summed loss (got {got.item():.4f}, expected {want.item():.4f})"
    return None


def prepare_compute(model: ImageBindLLM, compute: Compute, device: torch.device) -> torch.dtype:
    """Apply `compute` to a model whose phase is set (before it is wrapped or sharded): the frozen base's dtype,
    the loss's kernel and chunk, activation checkpointing. Returns the base dtype."""
    dtype = base_dtype(compute.base_dtype, device)
    cast = cast_frozen_base(model, dtype)
    model.fused_loss = fused_cross_entropy(compute.fused_kernels, device)
    model.loss_chunk = compute.loss_chunk
    model.checkpoint_layers(compute.activation_checkpointing)
    log.info("frozen base in %s (%d tensors cast), loss %s, activation checkpointing %s", str(dtype).split(".")[-1],
             cast, "fused (Liger-Kernel)" if model.fused_loss else f"chunked ({compute.loss_chunk} rows)",
             "on" if compute.activation_checkpointing else "off")  # fmt: skip
    return dtype


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


def shard_model(model: ImageBindLLM, device: torch.device, world: int) -> ImageBindLLM:
    """FSDP2 over the `world` ranks of the default process group, in place: one unit per LLaMA decoder layer (its
    weights are gathered for its own forward and backward only), then the root (embeddings, head, final norm, bind
    network, prefix queries, gates). Every parameter, frozen or not, becomes a DTensor sharded on dim 0 and lives
    on `device`. Gradients are reduce-scattered as the mean over the world, as DDP averages them.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _gathered(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The full tensor on the CPU (an all-gather when `t` is a DTensor: every rank must call); None unless `keep`."""
    full = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()
    return full.to("cpu", copy=True).contiguous() if keep else None


def _full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
    """`optimizer.state_dict()` with every sharded state tensor gathered whole.

    Parameters are keyed by their position in the param groups (`decay_groups` of the phase's parameters, in
    model order), the same whatever the world size or ddp/fsdp, so the state loads under either.
    """
    sd = optimizer.state_dict()
    state = {i: {k: _gathered(v, keep) if torch.is_tensor(v) else v for k, v in sorted(sd["state"][i].items())}
             for i in sorted(sd["state"])}  # fmt: skip
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def _shard_like_params(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state (from `_full_optimizer_state`) cut to this rank's shard of each sharded parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(params) != sum(len(g["params"]) for g in sd["param_groups"]):
        raise InputError(f"the checkpoint's optimizer state covers {sum(len(g['params']) for g in sd['param_groups'])}"
                         f" parameters, this run trains {len(params)}: not the same phase or model")  # fmt: skip
    state = {}
    for i, entries in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape and v.ndim else v
                    for k, v in entries.items()}  # fmt: skip
    return {"state": state, "param_groups": sd["param_groups"]}


def save_state(
    directory: str | None,
    model: ImageBindLLM,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    metadata: dict[str, Any] | None = None,
) -> None:
    """A training checkpoint: our model checkpoint + optimizer, step, history and RNG states (tensors only).

    The format does not depend on how the run was parallel. A sharded (FSDP) model gathers the checkpoint's
    tensors and the optimizer state collectively, so every rank calls this; only the one given a `directory`
    writes (the frozen base is never gathered).
    """
    keep = directory is not None
    tensors = {n: _gathered(p, keep) for n, p in phase_parameters(model).items()}
    optim = _full_optimizer_state(optimizer, keep)
    if directory is None:
        return
    meta = {**(metadata or {}), "step": state.step}
    write_checkpoint(os.path.join(directory, MODEL_DIR), model.config, tensors, meta)
    blob = {"step": state.step, "optimizer": optim, "rng": _rng_state(), "history": json.dumps(state.history)}
    torch.save(blob, os.path.join(directory, STATE_FILE))


def load_weights(directory: str, model: ImageBindLLM) -> None:
    """The checkpoint's weights into a model that is not sharded yet (FSDP shards it, as loaded, afterwards)."""
    _, tensors, _ = read_checkpoint(os.path.join(directory, MODEL_DIR))
    load_tensors(model, tensors, directory)


def load_progress(directory: str, optimizer: torch.optim.Optimizer) -> LoopState:
    """Optimizer state (cut to this rank's shards under FSDP), RNG states, step and history (weights-only read)."""
    blob = load_weights_only(os.path.join(directory, STATE_FILE))  # a refused file is named, never unpickled
    optimizer.load_state_dict(_shard_like_params(blob["optimizer"], optimizer))
    _set_rng_state(blob["rng"])
    return LoopState(step=int(blob["step"]), history=json.loads(blob["history"]))


def load_state(directory: str, model: ImageBindLLM, optimizer: torch.optim.Optimizer) -> LoopState:
    """Restore what `save_state` wrote into a model that is not sharded."""
    load_weights(directory, model)
    return load_progress(directory, optimizer)


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
) -> LoopState:
    """Run steps until `hyper.total_steps` (or `max_steps`), checkpointing every `checkpoint_every` and at the end
    (never when not `save`: benchmarks).

    The loss of a step is the token mean over the whole global batch (every worker's micro-batches): each
    micro-batch's summed loss (`ImageBindLLM.forward(sum_loss=True)`: no logits of the whole batch) is divided by
    the global count of answer tokens, so 1 worker and N workers with the same global batch compute the same
    gradient. Autocast runs in bfloat16 on CUDA, and wherever the frozen base is bfloat16 (`compute`).
    """
    set_phase(model, phase)
    resume = session.resume_dir()
    if resume:
        load_weights(resume, model)
    dtype = prepare_compute(model, compute or Compute(), session.device)
    wrapped = session.prepare(model)
    sharded = is_sharded(wrapped)
    if not sharded:
        model.to(session.device)
    # built after sharding: FSDP replaced the parameters by sharded ones, and the optimizer owns those
    trainable = phase_parameters(model, phase)
    optimizer = torch.optim.AdamW(decay_groups(trainable, hyper.weight_decay), lr=hyper.lr, betas=hyper.betas)
    state = LoopState()
    if resume:
        state = load_progress(resume, optimizer)
        log.info("resumed at step %d from %s", state.step, resume)
    end = min(hyper.total_steps, max_steps or hyper.total_steps)
    progress = Progress(log, f"stage {(metadata or {}).get('stage', '?')}", start_at=state.step)
    first = state.step + 1  # its line says the run is under way
    autocast = session.device.type == "cuda" or dtype == torch.bfloat16
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
            ctx = contextlib.nullcontext()
            if sharded:  # FSDP: gradients accumulate unsharded on each rank, reduce-scattered after the last
                wrapped.set_requires_gradient_sync(sync)
            elif not sync and hasattr(wrapped, "no_sync"):
                ctx = wrapped.no_sync()
            with ctx, torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=autocast):
                ids, labels = m.input_ids.to(session.device), m.labels.to(session.device)
                loss_sum = wrapped(ids, m.features.to(session.device), labels=labels, sum_loss=True).loss
            (loss_sum * session.world / tokens.clamp(min=1)).backward()
            total += loss_sum.detach()
        if hyper.clip_grad:  # the norm of the whole gradient, also when the gradients are DTensor shards
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
        if save and (state.step % checkpoint_every == 0 or state.step == end):
            _checkpoint(session, model, optimizer, state, metrics, metadata)
        elif state.step % REPORT_EVERY == 0:  # a Ray report synchronises the workers: not every step
            session.report(metrics, None, state.step)
        if session.rank == 0 and (progress.due() or state.step in (first, end)):
            detail = f"steps, loss {loss:.4f}, lr {lr:.3g}, {entry.tokens / max(entry.seconds, 1e-9):.0f} tokens/s"
            session.progress(progress.update(state.step, end, detail, force=True) or "")
    return state


def _checkpoint(session: Session, model: ImageBindLLM, optimizer: torch.optim.Optimizer, state: LoopState,
                metrics: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="ibllm-ckpt-") if session.rank == 0 else None
    try:
        if tmp or is_sharded(model):  # FSDP: every rank takes part in gathering what rank 0 writes
            save_state(tmp, model, optimizer, state, metadata)
        session.report(metrics, tmp, state.step, state.history)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
