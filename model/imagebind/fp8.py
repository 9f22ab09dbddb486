"""Optional FP8 for the vision trunk's linear layers (Ada/Hopper GPUs, torchao's float8 dynamic quantization).

torchao is not a dependency: it is the `fp8` extra (`pip install 'ibllm[fp8]'`), imported only when FP8 is asked
for. The weights and the activations entering each of the trunk's linear layers (the packed q/k/v projection, the
attention's output projection, both MLP layers) are quantised to float8 e4m3 with one scale per row; attention
itself, the norms, the stem, the head and every other tower stay in bfloat16. FP8 is accepted only where
`check_fp8` finds the embeddings within cosine 0.999 of float32 on real images.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from model.imagebind.layers import Attention

if TYPE_CHECKING:
    from model.imagebind.encoder import ImageBind
    from model.imagebind.model import ImageBindModel

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
MIN_COSINE = 0.999  # against float32, on real images
INSTALL = "pip install 'ibllm[fp8]' (torchao>=0.10)"


class FP8Unavailable(RuntimeError):
    """FP8 was asked for where it cannot run: no CUDA, an older GPU, no torchao, or weights not in bfloat16."""


class FP8Inexact(RuntimeError):
    """FP8 embeddings departed from float32 ones by more than `MIN_COSINE` allows."""


def require_fp8(device: torch.device, weights: torch.dtype) -> None:
    """Refuses, with the reason, unless FP8 can run here: a CUDA GPU of compute capability >= 8.9, torchao, and
    bfloat16 weights (torchao's float8 linear layers take bfloat16 activations)."""
    if device.type != "cuda":
        raise FP8Unavailable(
            f"FP8 needs a CUDA GPU of compute capability >= 8.9 (Ada or Hopper); this encoder runs "
            f"on {device.type}: set extract.fp8 false, or run on such a GPU"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise FP8Unavailable(
            f"FP8 needs compute capability >= 8.9 (Ada or Hopper); {name} has "
            f"{capability[0]}.{capability[1]}: set extract.fp8 false"
        )
    if weights != torch.bfloat16:
        raise FP8Unavailable(
            f"FP8 runs over bfloat16 weights, not {str(weights).removeprefix('torch.')}: use dtype "
            "bfloat16 (or auto) with the weights cast"
        )
    _torchao()


def _torchao() -> Any:
    """torchao's quantization API, imported on demand; refused with the install line when it is missing."""
    try:
        from torchao import quantization
    except ImportError as e:
        raise FP8Unavailable(f"FP8 needs torchao, which is not installed: {INSTALL}") from e
    return quantization


def pack_projections(trunk: nn.Module) -> None:
    """Gives every attention of `trunk` its packed q/k/v projection as an `nn.Linear` (`in_proj`), sharing the
    parameters, so that torchao's module-level quantisation finds it; the raw parameters are then dropped (the
    attention uses `in_proj` from here on, and the quantised copy is the only one kept)."""
    for attn in trunk.modules():
        if isinstance(attn, Attention) and attn.in_proj is None:
            out_dim, in_dim = attn.in_proj_weight.shape
            linear = nn.Linear(in_dim, out_dim, device="meta")
            linear.weight, linear.bias = attn.in_proj_weight, attn.in_proj_bias
            del attn.in_proj_weight, attn.in_proj_bias
            attn.in_proj = linear


def vision_to_fp8(model: ImageBindModel) -> None:
    """Quantises the vision trunk's linear layers to float8 (dynamic activations and weights, per-row scales), in
    place. Call `require_fp8` first."""
    ao = _torchao()
    trunk = model.modality_trunks["vision"]
    pack_projections(trunk)
    config = ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow())
    ao.quantize_(trunk, config)


def check_fp8(encoder: ImageBind, images: torch.Tensor | Sequence, batch_size: int = 64) -> float:
    """The smallest cosine between FP8 and float32 image embeddings of `images` (preprocessed (N, 3, 224, 224), or
    what `ImageBind.embed_images` takes); raises `FP8Inexact` below `MIN_COSINE`.

    `encoder` holds float32 weights (load it with weights="float32"); it is not changed: the reference is embedded
    in float32 without autocast, and an FP8 copy of the model (bfloat16 weights, FP8 vision linear layers) embeds
    the same images.
    """
    from model.imagebind.encoder import ImageBind

    if encoder.weight_dtype != torch.float32:
        raise ValueError("check_fp8 compares against float32: give an encoder loaded with weights='float32'")
    require_fp8(encoder.device, torch.bfloat16)
    reference = ImageBind(encoder.model, encoder.tokenizer, encoder.device, torch.float32, encoder.encoder_id)
    quantised = copy.deepcopy(encoder.model).to(torch.bfloat16)
    vision_to_fp8(quantised)
    fast = ImageBind(quantised, encoder.tokenizer, encoder.device, torch.bfloat16, encoder.encoder_id)
    if isinstance(images, torch.Tensor):
        embed = functools.partial(_embed_tensor, images=images, batch_size=batch_size)
    else:
        embed = functools.partial(ImageBind.embed_images, items=images, batch_size=batch_size)
    cos = F.cosine_similarity(embed(fast), embed(reference), dim=-1)
    lowest = float(cos.min())
    if lowest < MIN_COSINE:
        raise FP8Inexact(
            f"FP8 image embeddings reach cosine {lowest:.5f} with float32 on {len(cos)} images "
            f"(mean {float(cos.mean()):.5f}), below {MIN_COSINE}: keep extract.fp8 false"
        )
    return lowest


def _embed_tensor(encoder: ImageBind, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [encoder.encode({"vision": images[i : i + batch_size]})["vision"] for i in range(0, len(images), batch_size)]
    )
