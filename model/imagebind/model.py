"""The ImageBind model: per-modality stems, trunks, heads and output scaling, with the official key names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.imagebind.config import POINT, ImageBindConfig
from model.imagebind.layers import LN_EPS, Transformer
from model.imagebind.point import PointTrunk, point_head


class PadIm2Video(nn.Module):
    """An image (B, C, H, W) becomes a clip of `frames` identical frames (B, C, T, H, W)."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)
        return x


class PatchStem(nn.Module):
    """Patches -> tokens: `proj` (a conv, or pad + conv for vision, or a linear for IMU), then an optional norm."""

    def __init__(self, proj: nn.Module, norm_dim: int | None) -> None:
        super().__init__()
        self.proj = proj
        if norm_dim is not None:
            self.norm_layer = nn.LayerNorm(norm_dim)  # PyTorch's default eps 1e-5, as the official stems

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if x.ndim > 3:
            x = x.flatten(2).transpose(1, 2)  # (B, D, *grid) -> (B, N, D); audio grid is (mel, time): mel-major
        return self.norm_layer(x) if hasattr(self, "norm_layer") else x


class PosEmbed(nn.Module):
    """Holds `pos_embed` (1, N, D) under the official `pos_embedding_helper` name."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.02)


class PatchPreprocessor(nn.Module):
    """cls token + stem tokens + learned positions (vision, audio, depth, thermal)."""

    def __init__(self, stem_name: str, stem: PatchStem, num_patches: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        setattr(self, stem_name, stem)
        self.stem_name = stem_name
        self.pos_embedding_helper = PosEmbed(num_patches + 1, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        tokens = getattr(self, self.stem_name)(x)  # (B, N, D)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed, None


class IMUPreprocessor(nn.Module):
    """(B, 6, 2000) -> windows of 8 -> (B, 250, 48) -> linear + norm, cls token, positions."""

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        dim, k = cfg.imu_embed_dim, cfg.imu_kernel_size
        n = cfg.imu_length // k
        self.kernel = k
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.imu_stem = PatchStem(nn.Linear(cfg.imu_channels * k, dim, bias=False), dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        b = x.shape[0]
        windows = x.unfold(-1, self.kernel, self.kernel).permute(0, 2, 1, 3).reshape(b, -1, x.shape[1] * self.kernel)
        tokens = self.imu_stem(windows)  # (B, 250, D)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return tokens + self.pos_embed, None


class TextPreprocessor(nn.Module):
    """Token + position embeddings, and the causal mask every text block uses."""

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        dim, n = cfg.text_embed_dim, cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, n, dim) * 0.01)
        self.register_buffer("mask", torch.full((n, n), float("-inf")).triu(1))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[1]
        return self.token_embedding(tokens) + self.pos_embed[:, :n], self.mask[:n, :n]


class SelectElement(nn.Module):
    """Token `index` of (B, L, D)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


class TextHead(nn.Module):
    """The token at the end-of-text position (the largest id, first occurrence) -> LayerNorm -> projection."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=LN_EPS), nn.Linear(dim, out, bias=False))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])


class Normalize(nn.Module):
    """L2 normalisation over the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """x * min(exp(log_logit_scale), 100): a parameter for text, a fixed buffer for the other modalities."""

    def __init__(self, init: float, learnable: bool) -> None:
        super().__init__()
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100) * x


def _head(dim: int, out: int, dropout: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.LayerNorm(dim, eps=LN_EPS), SelectElement(0)]
    if dropout:
        layers.append(nn.Dropout(0.5))  # the IMU head's Linear is therefore index 3
    return nn.Sequential(*layers, nn.Linear(dim, out, bias=False))


def _preprocessor(cfg: ImageBindConfig, m: str) -> nn.Module:
    dim = cfg.dim(m)
    if m == "vision":
        kt, kh, kw = cfg.kernel_size
        conv = nn.Conv3d(3, dim, kernel_size=cfg.kernel_size, stride=cfg.kernel_size, bias=False)
        grid = (cfg.video_frames // kt) * (cfg.image_size // kh) * (cfg.image_size // kw)
        return PatchPreprocessor(
            "rgbt_stem", PatchStem(nn.Sequential(PadIm2Video(cfg.video_frames), conv), None), grid, dim
        )
    if m == "audio":
        k, s = cfg.audio_kernel_size, cfg.audio_stride
        conv = nn.Conv2d(1, dim, kernel_size=k, stride=s, bias=False)
        grid = ((cfg.audio_num_mel_bins - k) // s + 1) * ((cfg.audio_target_len - k) // s + 1)
        return PatchPreprocessor("rgbt_stem", PatchStem(conv, dim), grid, dim)
    if m in ("depth", "thermal"):
        k = getattr(cfg, f"{m}_kernel_size")
        conv = nn.Conv2d(1, dim, kernel_size=k, stride=k, bias=False)
        name = "depth_stem" if m == "depth" else "rgbt_stem"
        return PatchPreprocessor(name, PatchStem(conv, dim), (cfg.image_size // k) ** 2, dim)
    if m == "imu":
        return IMUPreprocessor(cfg)
    return TextPreprocessor(cfg)


class ImageBindModel(nn.Module):
    """ImageBind: `forward({modality: batch})` -> {modality: (B, out_embed_dim)} normalised, scaled embeddings.

    Any input of 5 or more dimensions is a batch of clips (B, S, ...): each clip is embedded, normalised and
    scaled, and the clips are averaged (not re-normalised), as in the official model. Videos are therefore 6-D
    (B, S, 3, T, H, W); images (B, 3, H, W); audio (B, S, 1, mel, frames); text (B, 77) token ids.
    """

    def __init__(self, cfg: ImageBindConfig) -> None:
        super().__init__()
        self.cfg = cfg
        tokens = [m for m in cfg.modalities if m != POINT]  # the point branch has its own grouping and trunk
        self.modality_preprocessors = nn.ModuleDict({m: _preprocessor(cfg, m) for m in tokens})
        self.modality_trunks = nn.ModuleDict(
            {
                m: Transformer(
                    cfg.dim(m),
                    cfg.heads(m),
                    cfg.blocks(m),
                    cfg.drop_path(m),
                    add_bias_kv=m not in ("vision", "text"),
                    pre_norm=m == "vision",
                )
                for m in tokens
            }
        )
        heads: dict[str, nn.Module] = {}
        post: dict[str, nn.Module] = {}
        for m in cfg.modalities:
            if m == "text":
                heads[m] = TextHead(cfg.dim(m), cfg.out_embed_dim)
                post[m] = nn.Sequential(Normalize(), LogitScale(1 / 0.07, learnable=True))
            else:
                heads[m] = point_head(cfg) if m == POINT else _head(cfg.dim(m), cfg.out_embed_dim, dropout=m == "imu")
                scale = cfg.logit_scales.get(m)
                post[m] = nn.Sequential(Normalize(), LogitScale(scale, False)) if scale else nn.Sequential(Normalize())
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)
        if POINT in cfg.modalities:  # built last: the other branches' seeded weights do not depend on it
            self.point_trunk = PointTrunk(cfg)

    @property
    def branches(self) -> list[str]:
        """The modalities this model embeds."""
        return list(self.modality_heads)

    def embed(self, modality: str, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """One modality's embeddings (B, out_embed_dim), normalised and scaled.

        Point clouds are (B, N, 3) with `start` (B,) the farthest-point sampling's first index of each cloud
        (index 0 when not given).
        """
        if modality not in self.modality_heads:
            raise KeyError(f"this model has no {modality!r} branch; it has {self.branches}")
        if modality == POINT:
            if x.ndim != 3 or x.shape[-1] != 3:
                raise ValueError(f"point clouds are (B, N, 3), got {tuple(x.shape)}")
            if start is None:
                start = torch.zeros(x.shape[0], dtype=torch.long)
            return self.modality_postprocessors[POINT](self.modality_heads[POINT](self.point_trunk(x, start)))
        clips = x.ndim >= 5
        if clips:
            b, s = x.shape[:2]
            x = x.reshape(b * s, *x.shape[2:])
        tokens, mask = self.modality_preprocessors[modality](x)
        h = self.modality_trunks[modality](tokens, mask)
        out = self.modality_heads[modality](h, x) if modality == "text" else self.modality_heads[modality](h)
        out = self.modality_postprocessors[modality](out)
        return out.reshape(b, s, -1).mean(dim=1) if clips else out

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.embed(m, x) for m, x in inputs.items()}
