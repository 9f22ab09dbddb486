"""The bind network: ImageBind feature -> LLaMA width, Linear then 3 residual RMSNorm + SwiGLU blocks (paper eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: computed in fp32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLUBlock(nn.Module):
    """x + f2(silu(f1(n)) * f3(n)) with n = RMSNorm(x); no biases."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.f1 = nn.Linear(dim, hidden, bias=False)
        self.f2 = nn.Linear(hidden, dim, bias=False)
        self.f3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        return x + self.f2(F.silu(self.f1(n)) * self.f3(n))


class BindNetwork(nn.Module):
    """Linear(feature_dim -> dim, bias) followed by `blocks` residual SwiGLU blocks of hidden size 4*dim."""

    def __init__(self, feature_dim: int = 1024, dim: int = 4096, blocks: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, dim)
        self.blocks = nn.ModuleList(SwiGLUBlock(dim, 4 * dim, eps) for _ in range(blocks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., feature_dim) -> (..., dim)."""
        x = self.proj(features.to(self.proj.weight.dtype))
        for block in self.blocks:
            x = block(x)
        return x
