"""Point-Bind's 3D branch: farthest-point grouping (fp32), mini-PointNet, Point-BERT transformer, projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.imagebind.config import ImageBindConfig
from model.imagebind.layers import DropPath

TRUNK_EPS = 1e-5  # every LayerNorm and BatchNorm of the point trunk (the point head's LayerNorm uses 1e-6)


def farthest_points(xyz: torch.Tensor, count: int, start: torch.Tensor) -> torch.Tensor:
    """Indices (B, count) of farthest-point sampling from `start` (B,) int64, in selection order.

    Each step takes the point farthest (squared distance, summed over x, y, z in this order, fp32) from the chosen
    set; among equal distances the lowest index wins. The first index is `start`.
    """
    b, n, _ = xyz.shape
    chosen = torch.empty(b, count, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, n), 1e10, dtype=xyz.dtype, device=xyz.device)
    current = start.to(device=xyz.device, dtype=torch.long)
    rows = torch.arange(b, device=xyz.device)
    for i in range(count):
        chosen[:, i] = current
        centre = xyz[rows, current].unsqueeze(1)  # (B, 1, 3)
        d = ((xyz - centre) ** 2).sum(-1)  # (B, N)
        nearest = torch.minimum(nearest, d)
        current = nearest.argmax(-1)  # the first maximum: the lowest index among ties
    return chosen


def nearest_neighbours(centres: torch.Tensor, xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, G, k) of each centre's k nearest points (unordered), from |c|^2 + |p|^2 - 2 c.p in fp32.

    The terms are summed in Point-BERT's order (-2 c.p, then + |c|^2, then + |p|^2), so the same neighbours are
    chosen where the k-th and (k+1)-th distances differ by rounding only.
    """
    d = -2 * torch.matmul(centres, xyz.transpose(1, 2))  # (B, G, N)
    d += (centres**2).sum(-1).unsqueeze(-1)
    d += (xyz**2).sum(-1).unsqueeze(1)
    return d.topk(k, dim=-1, largest=False, sorted=False).indices


def group(xyz: torch.Tensor, groups: int, size: int, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cloud (B, N, 3) -> (neighbourhoods relative to their centre (B, G, K, 3), centres (B, G, 3)), in fp32."""
    b, n, _ = xyz.shape
    if n < max(groups, size):
        raise ValueError(f"a cloud of {n} points is too small: this encoder needs at least {max(groups, size)}")
    rows = torch.arange(b, device=xyz.device)[:, None]
    centres = xyz[rows, farthest_points(xyz, groups, start)]  # (B, G, 3)
    idx = nearest_neighbours(centres, xyz, size)  # (B, G, K)
    return xyz[rows[:, :, None], idx] - centres.unsqueeze(2), centres


def _conv_norm(dims: tuple[int, int, int]) -> nn.Sequential:
    """1x1 Conv1d, BatchNorm1d, ReLU, 1x1 Conv1d (the official layout: Conv1d weights are (out, in, 1))."""
    a, hidden, out = dims
    return nn.Sequential(
        nn.Conv1d(a, hidden, 1), nn.BatchNorm1d(hidden, eps=TRUNK_EPS), nn.ReLU(), nn.Conv1d(hidden, out, 1)
    )


class GroupEncoder(nn.Module):
    """Mini-PointNet shared over groups: (B, G, K, 3) -> (B, G, encoder_dims), max-pooled twice over the K points."""

    def __init__(self, conv_dims: tuple[int, int, int], out: int) -> None:
        super().__init__()
        first_hidden, first_out, second_hidden = conv_dims
        self.first_conv = _conv_norm((3, first_hidden, first_out))
        self.second_conv = _conv_norm((2 * first_out, second_hidden, out))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = groups.shape
        x = self.first_conv(groups.reshape(b * g, k, 3).transpose(1, 2))  # (BG, C1, K)
        summary = x.amax(dim=2, keepdim=True).expand(-1, -1, k)
        x = self.second_conv(torch.cat([summary, x], dim=1))  # the summary first, then the per-point features
        return x.amax(dim=2).reshape(b, g, -1)


class PointAttention(nn.Module):
    """`qkv` without bias, split [q | k | v] then into heads; `proj` with bias; softmax over all tokens, no mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PointMlp(nn.Module):
    """fc1 (D -> 4D), exact GELU, fc2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PointBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)); x + mlp(norm2(x)); LayerNorm eps 1e-5."""

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=TRUNK_EPS)
        self.attn = PointAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=TRUNK_EPS)
        self.mlp = PointMlp(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PointBlocks(nn.Module):
    """The blocks, each given the running tokens plus the positional embedding (added before every block)."""

    def __init__(self, dim: int, heads: int, depth: int, drop_path: float) -> None:
        super().__init__()
        rates = [drop_path * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace(0, rate)
        self.blocks = nn.ModuleList(PointBlock(dim, heads, r) for r in rates)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointTransformer(nn.Module):
    """Point-BERT's encoder: grouping, group encoder, reduce_dim, positions of the centres, class token, blocks,
    final LayerNorm, then [class token, max over the group tokens] (B, 2 x embed dim)."""

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        dim = cfg.point_embed_dim
        self.groups, self.group_size = cfg.point_groups, cfg.point_group_size
        self.encoder = GroupEncoder(cfg.point_conv_dims, cfg.point_encoder_dims)
        self.reduce_dim = nn.Linear(cfg.point_encoder_dims, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        hidden = cfg.point_pos_hidden
        self.pos_embed = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, dim))  # on absolute centres
        self.blocks = PointBlocks(dim, cfg.point_num_heads, cfg.point_num_blocks, cfg.point_drop_path)
        self.norm = nn.LayerNorm(dim, eps=TRUNK_EPS)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, xyz: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xyz.device.type, enabled=False):  # neighbourhoods are chosen in fp32, whatever autocast
            neighbourhoods, centres = group(xyz.float(), self.groups, self.group_size, start)
        weights = self.reduce_dim.weight.dtype  # half when the weights were cast (then without autocast)
        neighbourhoods, centres = neighbourhoods.to(weights), centres.to(weights)
        tokens = self.reduce_dim(self.encoder(neighbourhoods))  # (B, G, D)
        pos = self.pos_embed(centres)  # absolute centres
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), pos], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)


class PointTrunk(nn.Module):
    """`point_encoder` then `pc_projection`, a bare (2 x embed dim, proj dim) matrix applied as x @ P (no bias)."""

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        self.point_encoder = PointTransformer(cfg)
        self.pc_projection = nn.Parameter(torch.randn(2 * cfg.point_embed_dim, cfg.point_proj_dim) * 0.02)

    def forward(self, xyz: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self.point_encoder(xyz, start) @ self.pc_projection


def point_head(cfg: ImageBindConfig) -> nn.Sequential:
    """LayerNorm (eps 1e-6), Dropout(0.5) (no parameters; the Linear is index 2), Linear to the joint space."""
    width = cfg.point_proj_dim
    return nn.Sequential(
        nn.LayerNorm(width, eps=1e-6), nn.Dropout(0.5), nn.Linear(width, cfg.out_embed_dim, bias=False)
    )


def seeded_starts(counts: list[int], seed: int) -> torch.Tensor:
    """One farthest-point start index per cloud, drawn from its own generator seeded with `seed`: a cloud gets the
    same start alone or in any batch (upstream draws them from torch's global generator, differently each call)."""
    return torch.tensor([int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed))) for n in counts])
