"""ImageBind transformer layers: packed-projection attention (with optional bias_k/v), MLP, pre-norm blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # blocks, the vision pre-norm and the heads; the stems' LayerNorms use PyTorch's default 1e-5


class Attention(nn.Module):
    """Multi-head self-attention with `torch.nn.MultiheadAttention`'s parameters and semantics.

    Parameters keep its names (`in_proj_weight` rows = [q; k; v], `in_proj_bias`, `out_proj`, `bias_k`, `bias_v`)
    so official checkpoints load as they are; the product runs through `scaled_dot_product_attention`.
    With `add_bias_kv`, one learned key/value is appended after the projection (keys L+1).
    """

    def __init__(self, dim: int, heads: int, add_bias_kv: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        self.in_proj: nn.Linear | None = None  # the packed projection as a module, once FP8 quantises it (fp8.py)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape  # (B, L, D)
        packed = self.in_proj(x) if self.in_proj is not None else F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = packed.chunk(3, dim=-1)  # (B, L, D) each
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(b, 1, d)], dim=1)  # (B, L+1, D)
            v = torch.cat([v, self.bias_v.expand(b, 1, d)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
        q, k, v = (t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 (D -> 4D), exact GELU, fc2."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability `p` while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm_1(x)); x + mlp(norm_2(x))."""

    def __init__(self, dim: int, heads: int, add_bias_kv: bool, drop_path: float) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, add_bias_kv)
        self.norm_2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm_1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm_2(x)))


class Transformer(nn.Module):
    """The trunk of one modality: an optional pre-LayerNorm (vision only), then the blocks; no final norm."""

    def __init__(self, dim: int, heads: int, depth: int, drop_path: float, add_bias_kv: bool, pre_norm: bool) -> None:
        super().__init__()
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS) if pre_norm else nn.Identity())
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace(0, rate)
        self.blocks = nn.ModuleList(Block(dim, heads, add_bias_kv, r) for r in rates)

    def forward(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pre_transformer_layer(tokens)  # (B, L, D)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x
