"""Image preprocessing for ImageBind: decode, orient, resize, crop and CLIP-normalise, as imagebind/data.py does."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model.imagebind.decode import (  # noqa: F401 (re-exported: the image preprocessing lives here)
    IMAGE_SIZE,
    ImageSource,
    TooManyPixels,
    center_crop_box,
    load_image,
    resize_crop,
    resized_size,
    to_rgb,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageBind-LLM's training augmentation: RandomResizedCrop(224, scale=(0.9, 1.0), ratio=(0.75, 1.3333), BICUBIC).
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (0.75, 1.3333)  # the reference writes 1.3333, not 4/3
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many random boxes before its fallback


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """`ToTensor` (divide by 255 in float32) then CLIP `Normalize`: uint8 (..., H, W, 3) -> float32 (..., 3, H, W)."""
    x = pixels.movedim(-1, -3).to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device)[:, None, None]
    return x.sub_(mean).div_(std).contiguous()


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """`ToTensor` then CLIP `Normalize` for an RGB image; returns (3, H, W) float32."""
    return normalize_pixels(torch.from_numpy(np.array(img, dtype=np.uint8)))


def preprocess_image(img: Image.Image) -> torch.Tensor:
    """ImageBind's inference transform: bicubic short-side resize to 224, centre crop, CLIP normalisation.

    Args:
        img: a PIL image of any mode (converted with `to_rgb`; orientation is `load_image`'s job, not this one's).

    Returns:
        (3, 224, 224) float32.
    """
    return to_normalized_tensor(resize_crop(img))


def random_resized_crop_params(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`, drawing from `generator` in the same order.

    Ten attempts at an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`; a box that fits
    gets a uniform position. Otherwise the centre crop of the image clamped to the ratio bounds.

    Returns:
        (top, left, height, width) of the crop box.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_r = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        aspect = torch.exp(log_r).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(img: Image.Image, generator: torch.Generator | int) -> torch.Tensor:
    """ImageBind-LLM's training transform: RandomResizedCrop(224, (0.9, 1.0), (0.75, 1.3333), bicubic), no flip.

    Args:
        img: a PIL image of any mode.
        generator: a `torch.Generator` (advanced by the call) or an integer seed.

    Returns:
        (3, 224, 224) float32.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    img = to_rgb(img)
    top, left, h, w = random_resized_crop_params(img.width, img.height, generator)
    crop = img.crop((left, top, left + w, top + h)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return to_normalized_tensor(crop)


def preprocess_images(items: Sequence[ImageSource | Image.Image], max_pixels: int | None = None) -> torch.Tensor:
    """Loads (paths, bytes) or takes (PIL images) a batch and applies `preprocess_image`; returns (B, 3, 224, 224).

    A file or bytes with more than `max_pixels` pixels is refused (`TooManyPixels`) before it is decoded.
    """
    if not items:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    tensors = [
        preprocess_image(it if isinstance(it, Image.Image) else load_image(it, max_pixels=max_pixels)) for it in items
    ]
    return torch.stack(tensors)  # (B, 3, 224, 224)
