"""Stable unCLIP on ImageBind embeddings: a local diffusers folder checked, loaded, and drawing images (torch only)."""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model.errors import ModelInputError

PIPELINE_CLASS = "StableUnCLIPImg2ImgPipeline"  # stabilityai/stable-diffusion-2-1-unclip(-small) as released
LOADED = ("unet", "vae", "text_encoder", "image_normalizer")  # the weighted components read (not the image encoder)
INSTALL = "pip install 'ibllm[apps]'"
RELEASED = "stabilityai/stable-diffusion-2-1-unclip (ViT-H, 1024-d: ImageBind-Huge)"


class MissingExtra(ModelInputError):
    """The optional dependency of an application is not installed."""


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise MissingExtra(f"any-to-image generation needs diffusers ({e}): {INSTALL}") from None
    return diffusers


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelInputError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(doc, dict):
        raise ModelInputError(f"{path}: {what} is not a JSON object")
    return doc


def check_folder(path: str) -> int:
    """The image-embedding size a Stable unCLIP folder takes; ModelInputError naming the folder when it is missing,
    not a Stable unCLIP image-variation pipeline, incomplete, or holds pickled (.bin) weights only."""
    if not os.path.isdir(path):
        raise ModelInputError(
            f"generator folder not found: {path} (download {RELEASED} there first; nothing is downloaded at run time)"
        )
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ModelInputError(
            f"{path} is not a diffusers pipeline folder (no model_index.json): give the folder of {RELEASED}"
        )
    kind = _read_json(index, "pipeline index").get("_class_name")
    if kind != PIPELINE_CLASS:
        raise ModelInputError(
            f"{path} holds a {kind} pipeline, not a Stable unCLIP image-variation pipeline "
            f"({PIPELINE_CLASS}): give the folder of {RELEASED}"
        )
    for name in LOADED:
        part = os.path.join(path, name)
        if not os.path.isfile(os.path.join(part, "config.json")):
            raise ModelInputError(f"{path}: the {name} component is missing ({part}/config.json)")
        if not glob.glob(os.path.join(part, "*.safetensors")):
            pickled = glob.glob(os.path.join(part, "*.bin"))
            why = "has only pickled .bin weights; ibllm loads safetensors only" if pickled else "has no weights"
            raise ModelInputError(f"{part} {why} (download the .safetensors files of {RELEASED})")
    dim = _read_json(os.path.join(path, "image_normalizer", "config.json"), "config").get("embedding_dim", 768)
    unet = _read_json(os.path.join(path, "unet", "config.json"), "config")
    if unet.get("class_embed_type") != "projection" or unet.get("projection_class_embeddings_input_dim") != 2 * dim:
        raise ModelInputError(
            f"{path}: the UNet does not take {dim}-d image embeddings with their noise-level "
            f"embedding (class_embed_type projection of {2 * dim} inputs)"
        )
    return int(dim)


def stats_norm(mean: torch.Tensor, std: torch.Tensor) -> float:
    """The root-mean-square norm of embeddings with these per-dimension statistics: sqrt(sum(mean^2 + std^2))."""
    return math.sqrt(float((mean.detach().double() ** 2 + std.detach().double() ** 2).sum()))


@functools.cache
def _pipeline_class() -> type:
    """diffusers' StableUnCLIPImg2ImgPipeline drawing from given image embeddings, with no image encoder loaded.

    Its own `_encode_image` reads the image encoder's dtype even when embeddings are given; this one noises the
    embeddings with diffusers' `noise_image_embeddings` (each request's noise from its own generator), repeats them
    per image and prepends the zeros of classifier-free guidance, as diffusers does.
    """
    base = _diffusers().StableUnCLIPImg2ImgPipeline

    class EmbeddingUnCLIP(base):  # type: ignore[misc, valid-type]
        def _encode_image(
            self,
            image: Any,
            device: torch.device,
            batch_size: int,
            num_images_per_prompt: int,
            do_classifier_free_guidance: bool,
            noise_level: torch.Tensor,
            generator: Any,
            image_embeds: torch.Tensor | None,
        ) -> torch.Tensor:
            if image_embeds is None:
                raise ValueError("this pipeline draws from image embeddings only (it has no image encoder)")
            rows = image_embeds.to(device=device, dtype=self.unet.dtype)  # (B, D)
            gens = generator if isinstance(generator, list) else [generator] * (len(rows) * num_images_per_prompt)
            noise = torch.cat(
                [
                    torch.randn((1, rows.shape[1]), generator=g, dtype=torch.float32)
                    for g in gens[::num_images_per_prompt]
                ]
            ).to(rows)
            embeds = self.noise_image_embeddings(image_embeds=rows, noise_level=noise_level, noise=noise)  # (B, 2D)
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)  # (B * n, 2D)
            if do_classifier_free_guidance:
                embeds = torch.cat([torch.zeros_like(embeds), embeds])
            return embeds

    return EmbeddingUnCLIP


@dataclass(frozen=True)
class Drawing:
    """What one request draws: its embedding's direction, its seed, its text prompt."""

    embedding: torch.Tensor  # (D,), any norm: only its direction is used
    seed: int
    prompt: str = ""


@dataclass
class UnCLIP:
    """A loaded Stable unCLIP pipeline and the norm ImageBind's unit embeddings are scaled to."""

    pipe: Any
    path: str
    dim: int
    norm: float

    @classmethod
    def load(cls, path: str, dim: int, device: torch.device, dtype: torch.dtype, norm: float | None = None) -> UnCLIP:
        """The pipeline in `path` (local files, safetensors, no image encoder), checked to take `dim`-d embeddings.

        `norm`: the length the embeddings are scaled to; None takes the normalizer's statistics (`stats_norm`).
        """
        taken = check_folder(path)
        if taken != dim:
            raise ModelInputError(
                f"generator {path} takes {taken}-d image embeddings, ImageBind gives {dim}-d: use "
                f"{RELEASED}, or the generator matching the configured ImageBind"
            )
        try:
            with warnings.catch_warnings():  # torch_dtype: the name every diffusers of the apps extra takes
                warnings.filterwarnings("ignore", message=".*`dtype`.*", category=FutureWarning)
                pipe = _pipeline_class().from_pretrained(
                    path,
                    image_encoder=None,
                    feature_extractor=None,
                    local_files_only=True,
                    use_safetensors=True,
                    torch_dtype=dtype,
                )
        except (OSError, ValueError) as e:
            raise ModelInputError(f"generator {path} cannot be loaded: {e}") from None
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        scale = stats_norm(pipe.image_normalizer.mean, pipe.image_normalizer.std) if norm is None else norm
        return cls(pipe, path, dim, scale)

    def condition(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> (B, D) image embeddings for unCLIP: each made unit length, then `norm` long."""
        return F.normalize(embeddings.float(), dim=-1) * self.norm

    @torch.no_grad()
    def draw(
        self,
        drawings: Sequence[Drawing],
        images: int = 1,
        steps: int = 20,
        guidance: float = 10.0,
        noise_level: int = 0,
        size: int | None = None,
    ) -> list[list[Any]]:
        """`images` PIL images per drawing, all denoised together; image i of a drawing seeded s starts from the
        noise of seed s + i, so a drawing gives the same pixels whatever it is batched with (up to float rounding
        of batched kernels). `size`: pixels per side (a multiple of 8; default the UNet's)."""
        device = self.pipe._execution_device
        embeds = self.condition(torch.stack([d.embedding for d in drawings]))
        gens = [torch.Generator("cpu").manual_seed(d.seed + i) for d in drawings for i in range(images)]
        out = self.pipe(
            prompt=[d.prompt for d in drawings],
            image_embeds=embeds.to(device),
            num_images_per_prompt=images,
            num_inference_steps=steps,
            guidance_scale=guidance,
            noise_level=noise_level,
            generator=gens,
            height=size,
            width=size,
            output_type="pil",
        ).images
        return [out[i * images : (i + 1) * images] for i in range(len(drawings))]
