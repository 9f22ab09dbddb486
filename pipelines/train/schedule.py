"""The optimisation of a stage: AdamW over the trained parameters, a linear warm-up then a half-cosine learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from model.llm.phases import decay_groups
from pipelines.config import StageConfig


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

    @classmethod
    def of(cls, settings: StageConfig, steps_per_epoch: int) -> Hyper:
        """A stage's settings over a run of `steps_per_epoch` steps an epoch: its warm-up and length in steps."""
        return cls(
            lr=settings.lr,
            min_lr=settings.min_lr,
            weight_decay=settings.weight_decay,
            warmup_steps=round(settings.warmup_epochs * steps_per_epoch),
            total_steps=max(1, math.ceil(settings.epochs * steps_per_epoch)),
            clip_grad=settings.clip_grad,
        )


def lr_at(step: int, h: Hyper) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then a half-cycle cosine down to `min_lr` (per iteration)."""
    if step < h.warmup_steps:
        return h.lr * step / h.warmup_steps
    span = max(1, h.total_steps - h.warmup_steps)
    return h.min_lr + (h.lr - h.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - h.warmup_steps) / span))


def adamw(trainable: dict[str, nn.Parameter], h: Hyper) -> torch.optim.Optimizer:
    """AdamW over `trainable`: weight decay on all but 1-D tensors and biases (`decay_groups`), `h`'s betas."""
    return torch.optim.AdamW(decay_groups(trainable, h.weight_decay), lr=h.lr, betas=h.betas)


def set_lr(optimizer: torch.optim.Optimizer, step: int, h: Hyper) -> float:
    """Give every parameter group the learning rate of `step`; returns it."""
    lr = lr_at(step, h)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
