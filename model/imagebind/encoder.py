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
from model.imagebind.config import ImageBindConfig
from model.imagebind.model import ImageBindModel
from model.imagebind.tokenizer import Tokenizer
from model.weights import file_digest, load_weights, read_state_dict

log = logging.getLogger(__name__)
ALIASES = {"image": "vision", "video": "vision", "vision": "vision", "text": "text", "audio": "audio",
           "depth": "depth", "thermal": "thermal", "imu": "imu"}  # fmt: skip
DType = Literal["auto", "float32", "bfloat16", "float16"]


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


@dataclass
class ImageBind:
    """A frozen ImageBind with its preprocessing.

    Attributes:
        model: the network (eval mode, no gradients).
        tokenizer: the CLIP BPE tokenizer, or None when no vocabulary was given (text then cannot be embedded).
        device: where the network runs.
        dtype: the autocast dtype (float32 means no autocast); outputs are always float32.
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
    ) -> ImageBind:
        """Build a preset and load its weights from `checkpoint`, or initialise it from `seed` (tests, demo)."""
        cfg = ImageBindConfig.from_preset(preset)
        torch.manual_seed(seed)
        model = ImageBindModel(cfg)
        if checkpoint:
            load_weights(model, read_state_dict(checkpoint), checkpoint)
        elif preset == "huge":
            log.warning("ImageBind huge with random weights: give model.imagebind_checkpoint for real features")
        encoder_id = encoder_id_for(preset, checkpoint, seed)
        dev = resolve_device(device)
        model = model.eval().requires_grad_(False).to(dev)
        tokenizer = Tokenizer(vocab) if vocab else None
        return cls(model, tokenizer, dev, resolve_dtype(dtype, dev), encoder_id)

    @property
    def dim(self) -> int:
        """Width of the joint embedding."""
        return self.model.cfg.out_embed_dim

    @torch.inference_mode()
    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Preprocessed batches per modality -> L2-normalised float32 embeddings (B, dim) on the CPU.

        Keys: vision (or image/video), text, audio, depth, thermal, imu. Clip batches (5-D and more) are averaged
        over their clips first, as in the official model, then normalised.
        """
        out = {}
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        for key, x in inputs.items():
            if key not in ALIASES:
                raise KeyError(f"unknown modality {key!r}; use one of {sorted(ALIASES)}")
            with autocast:
                emb = self.model.embed(ALIASES[key], x.to(self.device))
            out[key] = F.normalize(emb.float(), dim=-1).cpu()
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
