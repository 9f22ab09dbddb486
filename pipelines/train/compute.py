"""How the steps compute: the frozen base's dtype, the loss's kernel and chunk, activation checkpointing."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from model.llm.model import LOSS_CHUNK, ImageBindLLM
from model.llm.phases import phase_parameters
from pipelines.config import TrainConfig
from pipelines.errors import InputError
from pipelines.train.loss import fused_cross_entropy

log = logging.getLogger(__name__)


@dataclass
class Compute:
    """How the steps compute (pipelines.config.TrainConfig): the same losses and gradients up to rounding."""

    base_dtype: str = "auto"  # the frozen base's dtype: auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16
    fused_kernels: str = "auto"  # auto: Liger-Kernel's fused linear cross-entropy where importable on CUDA; off
    activation_checkpointing: bool = False  # recompute each decoder layer in backward
    loss_chunk: int = LOSS_CHUNK  # rows of logits at a time in the summed loss

    @classmethod
    def of(cls, train: TrainConfig) -> Compute:
        """The training section's settings (the loss chunk stays the model's default)."""
        return cls(train.base_dtype, train.fused_kernels, train.activation_checkpointing)


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


def prepare_compute(model: ImageBindLLM, compute: Compute, device: torch.device) -> torch.dtype:
    """Apply `compute` to a model whose phase is set (before it is wrapped or sharded): the frozen base's dtype,
    the loss's kernel and chunk, activation checkpointing. Returns the base dtype."""
    dtype = base_dtype(compute.base_dtype, device)
    cast = cast_frozen_base(model, dtype)
    model.fused_loss = fused_cross_entropy(compute.fused_kernels, device)
    model.loss_chunk = compute.loss_chunk
    model.checkpoint_layers(compute.activation_checkpointing)
    loss = "fused (Liger-Kernel)" if model.fused_loss else f"chunked ({compute.loss_chunk} rows)"
    name, ckpt = str(dtype).split(".")[-1], "on" if compute.activation_checkpointing else "off"
    log.info("frozen base in %s (%d tensors cast), loss %s, activation checkpointing %s", name, cast, loss, ckpt)
    return dtype
