"""ImageBind configuration: every size the official constructor exposes, with named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")  # imagebind_huge.pth's branches
POINT = "point"  # Point-Bind's 3D branch (imagebind_w3D.pth); its sizes are the point_* fields
ALL_MODALITIES = (*MODALITIES, POINT)


@dataclass(frozen=True)
class ImageBindConfig:
    """The shape of an ImageBind model; `huge` is the released one, `tiny` keeps its structure at toy widths."""

    out_embed_dim: int = 1024  # the joint embedding every modality is projected to
    modalities: tuple[str, ...] = MODALITIES  # which branches exist (a model may omit some)
    # vision: ViT over 2-frame clips (an image is repeated to 2 frames); 224 px, 14 px patches
    video_frames: int = 2
    kernel_size: tuple[int, int, int] = (2, 14, 14)
    image_size: int = 224
    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    vision_drop_path: float = 0.0
    # text: CLIP text transformer, causal, pooled at the end-of-text token
    text_embed_dim: int = 1024
    text_num_blocks: int = 24
    text_num_heads: int = 16
    text_drop_path: float = 0.0
    vocab_size: int = 49408
    context_length: int = 77
    # audio: ViT over a (mel bins x frames) log-mel image, 16 px patches with stride 10
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_drop_path: float = 0.1
    audio_kernel_size: int = 16
    audio_stride: int = 10
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    # depth and thermal: single-channel 224 px images, 16 px patches
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_drop_path: float = 0.0
    depth_kernel_size: int = 16
    thermal_embed_dim: int = 768
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_drop_path: float = 0.0
    thermal_kernel_size: int = 16
    # imu: 6 channels x 2000 samples, windows of 8
    imu_embed_dim: int = 512
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_drop_path: float = 0.7
    imu_kernel_size: int = 8
    imu_channels: int = 6
    imu_length: int = 2000
    # point (Point-Bind, Point-BERT trunk): clouds (B, N, 3) -> point_groups centres by farthest-point sampling,
    # point_group_size nearest neighbours each -> mini-PointNet (point_conv_dims, then point_encoder_dims) ->
    # transformer (embed dim, blocks, heads) -> [cls, max] (2 x embed) -> projection (point_proj_dim) -> head
    point_groups: int = 512
    point_group_size: int = 32
    point_conv_dims: tuple[int, int, int] = (128, 256, 512)  # first conv hidden, first conv out, second conv hidden
    point_encoder_dims: int = 256
    point_pos_hidden: int = 128
    point_embed_dim: int = 384
    point_num_blocks: int = 12
    point_num_heads: int = 6
    point_drop_path: float = 0.1
    point_proj_dim: int = 512
    # fixed output scales of the non-text modalities (text's is learnable, clipped at 100)
    logit_scales: dict[str, float] = field(
        default_factory=lambda: {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0, "point": 1.0}
    )
    preset: str = "custom"

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(ALL_MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; known: {ALL_MODALITIES}")
        for m in self.modalities:
            dim, heads = self.dim(m), self.heads(m)
            if dim % heads:
                raise ValueError(f"{m}: embed dim {dim} is not divisible by {heads} heads")

    def dim(self, modality: str) -> int:
        """Width of a modality's transformer."""
        return getattr(self, f"{modality}_embed_dim")

    def heads(self, modality: str) -> int:
        """Attention heads of a modality's transformer."""
        return getattr(self, f"{modality}_num_heads")

    def blocks(self, modality: str) -> int:
        """Depth of a modality's transformer."""
        return getattr(self, f"{modality}_num_blocks")

    def drop_path(self, modality: str) -> float:
        """Stochastic-depth rate of the last block (linear from 0)."""
        return getattr(self, f"{modality}_drop_path")

    def with_point(self, point: bool = True) -> ImageBindConfig:
        """This configuration with the point branch added (or removed), the other branches as they are."""
        kept = tuple(m for m in self.modalities if m != POINT)
        return replace(self, modalities=(*kept, POINT) if point else kept)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints' JSON config."""
        return asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ImageBindConfig:
        """A named preset (`huge`, `base`, `tiny`), optionally with some values changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown ImageBind preset {name!r}; presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, ImageBindConfig] = {
    # imagebind_huge(): the released 1.2B-parameter model
    "huge": ImageBindConfig(preset="huge"),
    # a mid-size model (ViT-B/14-like vision) for benchmarks and experiments
    "base": ImageBindConfig(
        vision_embed_dim=768,
        vision_num_blocks=12,
        vision_num_heads=12,
        text_embed_dim=512,
        text_num_blocks=12,
        text_num_heads=8,
        audio_embed_dim=384,
        audio_num_blocks=6,
        audio_num_heads=6,
        depth_embed_dim=192,
        depth_num_blocks=4,
        depth_num_heads=4,
        thermal_embed_dim=192,
        thermal_num_blocks=4,
        thermal_num_heads=4,
        imu_embed_dim=192,
        imu_num_blocks=2,
        imu_num_heads=4,
        preset="base",
    ),
    # the structure of huge at toy widths: tests and the demo (out_embed_dim stays 1024: the feature contract)
    "tiny": ImageBindConfig(
        vision_embed_dim=64,
        vision_num_blocks=2,
        vision_num_heads=4,
        text_embed_dim=64,
        text_num_blocks=2,
        text_num_heads=4,
        audio_embed_dim=32,
        audio_num_blocks=2,
        audio_num_heads=2,
        depth_embed_dim=32,
        depth_num_blocks=1,
        depth_num_heads=2,
        thermal_embed_dim=32,
        thermal_num_blocks=1,
        thermal_num_heads=2,
        imu_embed_dim=32,
        imu_num_blocks=1,
        imu_num_heads=2,
        point_groups=16,
        point_group_size=8,
        point_conv_dims=(16, 32, 64),
        point_encoder_dims=32,
        point_pos_hidden=16,
        point_embed_dim=32,
        point_num_blocks=2,
        point_num_heads=2,
        point_proj_dim=64,
        preset="tiny",
    ),
}
