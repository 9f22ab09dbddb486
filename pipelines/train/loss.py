"""The loss's kernel: Liger-Kernel's fused linear cross-entropy where it is installed and proven right, else none."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from model.llm.model import IGNORE
from pipelines.errors import InputError

log = logging.getLogger(__name__)


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
        log.warning(
            "fused_kernels auto: Liger-Kernel's fused cross-entropy %s; the chunked cross-entropy is used", problem
        )
        return None
    return fused


def _fused_loss_problem(fused: Callable[..., torch.Tensor], device: torch.device) -> str | None:
    """None when `fused` gives the summed, IGNORE-skipping cross-entropy (and its gradient) on a small bf16 case;
    else what went wrong: a version that averages, or any error, must not train with a wrong loss."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 64, generator=g).to(device, torch.bfloat16).requires_grad_()  # (N, C)
    weight = (0.1 * torch.randn(96, 64, generator=g)).to(device, torch.bfloat16)  # (V, C)
    targets = torch.tensor([3, IGNORE, 7, 95, IGNORE, 0], device=device)  # (N,)
    want = nn.functional.cross_entropy(rows.float() @ weight.float().T, targets, ignore_index=IGNORE, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, rows)
    try:
        got = fused(weight, rows, targets, None)
        (grad,) = torch.autograd.grad(got, rows)
    except Exception as e:  # a kernel that does not build or run here
        return f"failed a check ({type(e).__name__}: {e})"
    same_grad = torch.allclose(grad.float(), want_grad.float(), rtol=0.05, atol=1e-2)
    if not torch.allclose(got.float(), want, rtol=0.02) or not same_grad:
        return f"does not give the summed loss (got {got.item():.4f}, expected {want.item():.4f})"
    return None
