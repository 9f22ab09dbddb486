"""The ImageBind API the system uses: load once, `encode` batches, embed files; device and dtype handling."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from model.imagebind import audio, image, video
from model.imagebind import fp8 as fp8_ops
from model.imagebind.config import POINT, ImageBindConfig
from model.imagebind.model import ImageBindModel
from model.imagebind.point import seeded_starts
from model.imagebind.point_files import load_point_cloud, prepare_cloud
from model.imagebind.tokenizer import Tokenizer
from model.weights import check_state, file_digest, read_state_dict

log = logging.getLogger(__name__)
ALIASES = {
    "image": "vision",
    "video": "vision",
    "vision": "vision",
    "text": "text",
    "audio": "audio",
    "depth": "depth",
    "thermal": "thermal",
    "imu": "imu",
    "point": "point",
}
POINT_KEYS = ("point_trunk.", "modality_heads.point.", "modality_postprocessors.point.")  # imagebind_w3D.pth's
NO_POINT_WEIGHTS = (
    "this ImageBind has no point branch: its checkpoint holds no Point-Bind weights; set "
    "model.point_checkpoint to imagebind_w3D.pth"
)
DType = Literal["auto", "float32", "bfloat16", "float16"]
Weights = Literal["auto", "float32", "cast"]


def encoder_id_for(preset: str, checkpoint: str | None, seed: int = 0) -> str:
    """Names the weights: `imagebind-<preset>-<sha of the checkpoint file>`, or `-init<seed>` for seeded weights."""
    return f"imagebind-{preset}-{file_digest(checkpoint)}" if checkpoint else f"imagebind-{preset}-init{seed}"


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_weights(weights: Weights, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the frozen weights are held in.

    `auto`: cast to a half `dtype` on a GPU (the matmuls then read half the bytes and no autocast casts a weight
    per call), float32 on the CPU, where a half `dtype` runs as autocast over float32 weights as before.
    `cast`: held in `dtype` on any device. `float32`: always float32 (a half `dtype` is then autocast).
    """
    if dtype == torch.float32 or weights == "float32":
        return torch.float32
    if weights == "cast" or device.type == "cuda":
        return dtype
    return torch.float32


@dataclass
class ImageBind:
    """A frozen ImageBind with its preprocessing.

    Attributes:
        model: the network (eval mode, no gradients).
        tokenizer: the CLIP BPE tokenizer, or None when no vocabulary was given (text then cannot be embedded).
        device: where the network runs.
        dtype: the compute dtype: float32, or a half dtype run either in weights of that dtype (`weight_dtype`, a
            GPU's default) or as autocast over float32 weights (the CPU's); outputs are always float32.
        encoder_id: names the weights: `imagebind-<preset>-<sha of the checkpoint>` or `...-init<seed>`.
    """

    model: ImageBindModel
    tokenizer: Tokenizer | None
    device: torch.device
    dtype: torch.dtype
    encoder_id: str

    @classmethod
    def load(
        cls,
        preset: str = "tiny",
        checkpoint: str | None = None,
        vocab: str | None = None,
        device: str = "auto",
        dtype: DType = "auto",
        seed: int = 0,
        point_checkpoint: str | None = None,
        weights: Weights = "auto",
        fp8: bool = False,
    ) -> ImageBind:
        """Build a preset and load its weights from `checkpoint`, or initialise it from `seed` (tests, demo).

        The point branch (Point-Bind) exists when its weights do: in `checkpoint` (imagebind_w3D.pth holds all
        seven branches), in `point_checkpoint` (its point tensors are taken, the rest of that file is not read into
        the model), or seeded with the others when there is no checkpoint. `encoder_id` names `checkpoint` only:
        the point weights change no stored feature.

        `weights` (see `resolve_weights`): by default a GPU holds the weights in a half `dtype`, the CPU in float32.
        `fp8` runs the vision trunk's linear layers in FP8 (`model.imagebind.fp8`: Hopper or Ada, torchao, bfloat16
        weights); refused otherwise.
        """
        state = read_state_dict(checkpoint) if checkpoint else {}
        point_state = _point_tensors(point_checkpoint) if point_checkpoint else {}
        has_point = not checkpoint or any(k.startswith(POINT_KEYS) for k in state) or bool(point_state)
        cfg = ImageBindConfig.from_preset(preset).with_point(has_point)
        torch.manual_seed(seed)
        model = ImageBindModel(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if point_checkpoint:
            point_keys = {k: s for k, s in expected.items() if k.startswith(POINT_KEYS)}
            check_state(point_keys, point_state, point_checkpoint, "this ImageBind's point branch")
            state = {k: v for k, v in state.items() if not k.startswith(POINT_KEYS)}
            expected = {k: s for k, s in expected.items() if k not in point_keys}
        if checkpoint:
            check_state(expected, state, checkpoint, "this ImageBind model")
        if state or point_state:
            model.load_state_dict({**model.state_dict(), **state, **point_state}, strict=True)
        if not checkpoint and preset == "huge":
            log.warning("ImageBind huge with random weights: give model.imagebind_checkpoint for real features")
        encoder_id = encoder_id_for(preset, checkpoint, seed)
        dev = resolve_device(device)
        compute = resolve_dtype(dtype, dev)
        held = resolve_weights(weights, compute, dev)
        if fp8:
            fp8_ops.require_fp8(dev, held)  # before the weights move
        model = model.eval().requires_grad_(False).to(dev, held)
        if fp8:
            fp8_ops.vision_to_fp8(model)
        tokenizer = Tokenizer(vocab) if vocab else None
        return cls(model, tokenizer, dev, compute, encoder_id)

    @property
    def dim(self) -> int:
        """Width of the joint embedding."""
        return self.model.cfg.out_embed_dim

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights are held in (float32, or `dtype` when they were cast)."""
        return next(self.model.parameters()).dtype  # the first stem's (FP8 quantises trunks only)

    @property
    def has_points(self) -> bool:
        """Whether this encoder embeds point clouds (it has Point-Bind's branch)."""
        return POINT in self.model.branches

    @torch.inference_mode()
    def encode(
        self, inputs: Mapping[str, torch.Tensor], point_seed: int = 0, on_device: bool = False
    ) -> dict[str, torch.Tensor]:
        """Preprocessed batches per modality -> L2-normalised float32 embeddings (B, dim) on the CPU.

        Keys: vision (or image/video), text, audio, depth, thermal, imu, point. Clip batches (5-D and more) are
        averaged over their clips first, as in the official model, then normalised. Point clouds (B, N, 3) start
        their farthest-point sampling at an index drawn from `point_seed` alone (`seeded_starts`).

        With half weights, floating inputs are cast to the weights' dtype and no autocast runs; token ids stay
        integers and point clouds float32 (they are grouped in float32, then cast). `on_device` leaves the
        embeddings on the encoder's device, unsynchronised (the caller copies them when it needs them).
        """
        out = {}
        cast = self.weight_dtype != torch.float32
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32 and not cast)
        for key, x in inputs.items():
            if key not in ALIASES:
                raise KeyError(f"unknown modality {key!r}; use one of {sorted(ALIASES)}")
            if key == POINT and not self.has_points:
                raise ValueError(NO_POINT_WEIGHTS)
            start = seeded_starts([x.shape[1]] * x.shape[0], point_seed) if key == POINT else None
            x = x.to(self.device)
            if cast and key != POINT and x.is_floating_point():
                x = x.to(self.weight_dtype)
            with autocast:
                emb = self.model.embed(ALIASES[key], x, start)
            emb = F.normalize(emb.float(), dim=-1)
            out[key] = emb if on_device else emb.cpu()
        return out

    def _batched(self, key: str, items: Sequence, prepare: Callable, batch_size: int) -> torch.Tensor:
        parts = [self.encode({key: prepare(items[i : i + batch_size])})[key] for i in range(0, len(items), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    def embed_images(self, items: Sequence, batch_size: int = 64, max_pixels: int | None = None) -> torch.Tensor:
        """Paths, bytes or PIL images -> (N, dim); a file above `max_pixels` pixels is refused before it is decoded."""
        prepare = functools.partial(image.preprocess_images, max_pixels=max_pixels)
        return self._batched("vision", items, prepare, batch_size)

    def embed_audio(self, paths: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Audio files -> (N, dim) (3 clips of 2 s each, averaged)."""
        return self._batched("audio", paths, audio.preprocess_audio, batch_size)

    def embed_video(self, paths: Sequence[str], batch_size: int = 2, max_pixels: int | None = None) -> torch.Tensor:
        """Video files -> (N, dim) (5 clips x 3 crops, averaged); frames above `max_pixels` pixels are refused."""
        prepare = functools.partial(video.preprocess_videos, max_pixels=max_pixels)
        return self._batched("vision", paths, prepare, batch_size)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Strings -> (N, dim)."""
        if self.tokenizer is None:
            raise ValueError("no CLIP BPE vocabulary was given (model.imagebind_vocab), so text cannot be embedded")
        return self._batched("text", list(texts), self.tokenizer, batch_size)

    def embed_points(
        self,
        clouds: Sequence[str | torch.Tensor],
        batch_size: int = 8,
        normalize: bool = False,
        points: int | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Point-cloud files (see `point_files.FORMATS`) or (N, 3) tensors -> (len, dim).

        As ImageBind-LLM's inference, clouds are used as given; `normalize` centres each on its mean and scales it
        into the unit sphere (Point-Bind's training data), `points` resamples each to that many points (seeded).
        Neighbouring clouds of one size are batched; `seed` fixes the sampling's start and any resampling.
        """
        if not self.has_points:
            raise ValueError(NO_POINT_WEIGHTS)
        loaded = [_prepare_cloud(c, normalize, points, seed) for c in clouds]
        parts, i = [], 0
        while i < len(loaded):
            j = i + 1
            while j < len(loaded) and j - i < batch_size and loaded[j].shape == loaded[i].shape:
                j += 1
            parts.append(self.encode({POINT: torch.stack(loaded[i:j])}, point_seed=seed)[POINT])
            i = j
        return torch.cat(parts) if parts else torch.empty(0, self.dim)


def _prepare_cloud(cloud: str | torch.Tensor, normalize: bool, points: int | None, seed: int) -> torch.Tensor:
    if isinstance(cloud, str):
        return load_point_cloud(cloud, normalize=normalize, points=points, seed=seed)
    return prepare_cloud(cloud, normalize, points, seed)


def _point_tensors(path: str) -> dict[str, torch.Tensor]:
    """The point branch's tensors of a checkpoint (imagebind_w3D.pth holds them beside a whole ImageBind)."""
    return {k: v for k, v in read_state_dict(path, mmap=True).items() if k.startswith(POINT_KEYS)}
