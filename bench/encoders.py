"""Benchmark: ImageBind vision throughput per preset and dtype, image preprocessing per core vs plain Pillow, and
Point-Bind's point encoder (clouds/s at 8,192 points, with the share spent in the fp32 grouping).

Usage: python bench/encoders.py [--presets tiny base] [--gpu-presets huge] [--batch 64] [--seconds 10]
On a CUDA machine `huge` runs in bf16 and fp32 and is set against the FLOP bound (ViT-H/14 at 224 px is about
335 GFLOPs per image; an H200 gives about 989 dense bf16 TFLOP/s, so about 2,950 images/s at most).
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

from model.imagebind.config import ImageBindConfig
from model.imagebind.model import ImageBindModel

H200_BF16_TFLOPS = 989.0
HUGE_GFLOPS_PER_IMAGE = 335.0


def vision_rate(preset: str, device: str, dtype: torch.dtype, batch: int, seconds: float) -> float:
    """Images per second through the vision branch (preprocessed tensors in, embeddings out)."""
    cfg = ImageBindConfig.from_preset(preset, modalities=("vision",))
    model = ImageBindModel(cfg).eval().to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        model.embed("vision", x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.embed("vision", x)
            n += batch
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def point_rates(device: str, dtype: torch.dtype, batch: int, seconds: float, points: int = 8192) -> tuple[float, float]:
    """(clouds/s through the released-size point branch, clouds/s of its grouping alone: FPS + kNN in fp32)."""
    from model.imagebind.point import group

    cfg = ImageBindConfig.from_preset("huge", modalities=("point",))
    model = ImageBindModel(cfg).eval().to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, points, 3, generator=g).to(device)
    x = x / x.norm(dim=-1).amax(dim=1)[:, None, None]  # unit sphere, like Point-Bind's data
    start = torch.randint(points, (batch,), generator=g)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def rate(fn) -> float:
        with torch.inference_mode(), autocast:
            fn()  # warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                n += batch
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    return rate(lambda: model.embed("point", x, start)), rate(lambda: group(x, cfg.point_groups, 32, start))


def jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((side, int(side * 1.5), 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).filter(ImageFilter.GaussianBlur(2)).save(buf, "JPEG", quality=90)  # photo-like entropy
    return buf.getvalue()


def preprocessing_rates(side: int, seconds: float) -> tuple[float, float]:
    """(ours, plain Pillow decode + resize) images/s on one core for JPEGs of this short side."""
    from model.imagebind.image import load_image, preprocess_image

    data = [jpeg(side, s) for s in range(16)]

    def pillow(b: bytes) -> None:
        img = Image.open(io.BytesIO(b)).convert("RGB")
        img.resize((int(224 * img.width / img.height), 224), Image.BICUBIC)

    def ours(b: bytes) -> None:
        preprocess_image(load_image(b))

    rates = []
    for fn in (ours, pillow):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(data[n % len(data)])
            n += 1
        rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--gpu-presets", nargs="+", default=["huge"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"vision encoder throughput (batch {args.batch}, {args.seconds:.0f} s each)")
    for preset in args.presets:
        for dtype in (torch.float32, torch.bfloat16):
            rate = vision_rate(preset, "cpu", dtype, args.batch, args.seconds)
            print(f"  cpu  {preset:<5} {str(dtype).split('.')[-1]:<9} {rate:9.1f} images/s ({os.cpu_count()} cores)")
    if torch.cuda.is_available():
        for preset in args.gpu_presets:
            for dtype in (torch.bfloat16, torch.float32):
                rate = vision_rate(preset, "cuda", dtype, args.batch, args.seconds)
                line = f"  cuda {preset:<5} {str(dtype).split('.')[-1]:<9} {rate:9.1f} images/s"
                if preset == "huge" and dtype == torch.bfloat16:
                    bound = H200_BF16_TFLOPS * 1e3 / HUGE_GFLOPS_PER_IMAGE
                    line += f"  ({rate / bound:.0%} of the ~{bound:,.0f} images/s FLOP bound of an H200)"
                print(line)
    else:
        print("  cuda: no GPU on this machine; run this on a CUDA machine for the huge figures")
    print("point encoder (Point-Bind, released size: 512 groups of 32, 12 blocks of 384), 8,192-point clouds")
    runs = [("cpu", torch.float32, 8)] + (
        [("cuda", torch.bfloat16, 64), ("cuda", torch.float32, 64)] if torch.cuda.is_available() else []
    )
    for device, dtype, batch in runs:
        whole, grouping = point_rates(device, dtype, batch, args.seconds / 2)
        print(
            f"  {device:<4} {str(dtype).split('.')[-1]:<9} batch {batch:>3}: {whole:8.1f} clouds/s; grouping alone "
            f"{grouping:8.1f} clouds/s ({whole / grouping:.0%} of the time)"
        )
    torch.set_num_threads(1)
    print("image preprocessing on one core (decode, RGB, bicubic short side 224, crop, normalise)")
    for side in (256, 512):
        ours, pillow = preprocessing_rates(side, args.seconds / 2)
        print(
            f"  {side} px JPEG: ours {ours:7.1f} images/s, Pillow decode + resize alone {pillow:7.1f} images/s "
            f"({ours / pillow:.2f}x)"
        )


if __name__ == "__main__":
    main()
