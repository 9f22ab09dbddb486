"""A training checkpoint's files: the model checkpoint (`model/`) and, beside it, the optimizer, RNG states, step and
loss history (`state.pt`), in one format whatever the parallelism of the run."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.llm.checkpoint import load_tensors, read_checkpoint, write_checkpoint
from model.llm.model import ImageBindLLM
from model.llm.phases import phase_parameters
from model.weights import load_weights_only
from pipelines.train.parallel import full_optimizer_state, gathered, shard_like_params

STATE_FILE = "state.pt"
MODEL_DIR = "model"


@dataclass
class LoopState:
    """What a checkpoint carries besides the weights."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    numpy = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": numpy[1].tolist(),
        "numpy_pos": int(numpy[2]),
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))


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
    tensors = {n: gathered(p, keep) for n, p in phase_parameters(model).items()}
    optim = full_optimizer_state(optimizer, keep)
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
    optimizer.load_state_dict(shard_like_params(blob["optimizer"], optimizer))
    _set_rng_state(blob["rng"])
    return LoopState(step=int(blob["step"]), history=json.loads(blob["history"]))


def load_state(directory: str, model: ImageBindLLM, optimizer: torch.optim.Optimizer) -> LoopState:
    """Restore what `save_state` wrote into a model that is not sharded."""
    load_weights(directory, model)
    return load_progress(directory, optimizer)
