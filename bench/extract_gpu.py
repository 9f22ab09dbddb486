"""Benchmark (CUDA): the extraction actor's samples/s against ImageBind's image and text towers alone.

Usage: python bench/extract_gpu.py [--preset huge] [--batch 256] [--seconds 10] [--device auto]
The towers alone: one `encode` of both towers per batch, inputs already on the GPU (normalised float32 pixels and
token ids), embeddings left there; once over float32 weights with bf16 autocast (the project's former way) and
once over bf16 weights. The actor: `pipelines/extract/encode.py`'s `Encoder` called as Ray Data calls it (uint8
pixels and token ids in host memory, float16 columns back), by one caller and by `CALLS_IN_FLIGHT` callers at once
(what the extraction stage lets Ray Data do on a GPU); Ray's own moving of batches is not in it. With torchao and a
GPU of compute capability >= 8.9 it also runs FP8 for the vision trunk. Random weights, real shapes. On a machine
without CUDA it says so and stops (`--device cpu --preset tiny` runs the same code as a smoke test).
`bench/gpu.py` imports `towers_rate` and `actor_rate`.
"""

from __future__ import annotations

import argparse
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from model.imagebind import fp8 as fp8_ops
from model.imagebind.encoder import ImageBind, Weights
from model.imagebind.image import normalize_pixels
from pipelines.extract.encode import CALLS_IN_FLIGHT, Encoder


@functools.lru_cache(maxsize=2)
def load(preset: str, device: str, dtype: str, weights: Weights = "auto", fp8: bool = False) -> ImageBind:
    """A seeded ImageBind, kept for the next call with the same arguments (huge takes a while to initialise)."""
    return ImageBind.load(preset, device=device, dtype=dtype, weights=weights, fp8=fp8, seed=0)


def host_batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as the extraction's readers hand it to the actor: uint8 (n, 224, 224, 3) pixels, int64 token ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 40_000, (n, 77)).astype(np.int64)
    tokens[:, 20] = 49_407  # an end-of-text id, as the tokenizer writes (the text head takes the largest id)
    return {
        "kind": np.array(["sample"] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "uid": np.array([str(i) for i in range(n)], dtype=object),
        "pixels": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
        "tokens": tokens,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def towers_rate(
    preset: str,
    batch: int,
    seconds: float,
    device: str = "cuda",
    dtype: str = "bfloat16",
    weights: Weights = "auto",
    fp8: bool = False,
) -> float:
    """Samples/s of the image and text towers in one `encode` call per batch, inputs on the device already."""
    encoder = load(preset, device, dtype, weights, fp8)
    host = host_batch(batch)
    pixels = normalize_pixels(torch.from_numpy(host["pixels"]).to(encoder.device))
    tokens = torch.from_numpy(host["tokens"]).to(encoder.device)
    encoder.encode({"vision": pixels, "text": tokens}, on_device=True)  # warm-up
    _sync(encoder.device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode({"vision": pixels, "text": tokens}, on_device=True)
        n += batch
    _sync(encoder.device)
    return n / (time.perf_counter() - start)


def actor_rate(
    preset: str,
    batch: int,
    seconds: float,
    device: str = "cuda",
    dtype: str = "bfloat16",
    weights: Weights = "auto",
    fp8: bool = False,
    calls: int | None = None,
) -> float:
    """Samples/s of the extraction actor on host batches, `calls` callers at once (default: as the stage lets Ray
    Data call a GPU actor, one call at a time on the CPU); every call returns its columns, so the time is whole."""
    actor = Encoder.wrapping(load(preset, device, dtype, weights, fp8))
    calls = calls or (CALLS_IN_FLIGHT if actor.gpu else 1)
    host = host_batch(batch)
    actor(host)  # warm-up: kernels, pinned buffers
    start = time.perf_counter()

    def caller() -> int:
        done = 0
        while time.perf_counter() - start < seconds:
            actor(host)
            done += batch
        return done

    with ThreadPoolExecutor(max_workers=calls) as pool:
        n = sum(f.result() for f in [pool.submit(caller) for _ in range(calls)])
    rate = n / (time.perf_counter() - start)
    actor.torch_thread.shutdown()
    return rate


def fp8_ready(device: str) -> str | None:
    """None when FP8 can run here, else why not."""
    try:
        fp8_ops.require_fp8(torch.device(device), torch.bfloat16)
    except fp8_ops.FP8Unavailable as e:
        return str(e)
    return None


def report(preset: str, batch: int, seconds: float, device: str = "cuda", dtype: str = "bfloat16") -> None:
    """Prints the actor against the towers alone, bf16 weights against autocast, and FP8 where it can run."""
    print(f"extraction actor vs the two towers alone: {preset}, batch {batch}, {dtype}, {seconds:.0f} s each, {device}")
    autocast = towers_rate(preset, batch, seconds, device, dtype, weights="float32")
    towers = towers_rate(preset, batch, seconds, device, dtype)
    print(f"  towers alone, float32 weights + autocast: {autocast:9.1f} samples/s")
    print(f"  towers alone, {dtype} weights:         {towers:9.1f} samples/s ({towers / autocast:.2f}x autocast)")
    for calls in sorted({1, CALLS_IN_FLIGHT if device == "cuda" else 1}):
        rate = actor_rate(preset, batch, seconds, device, dtype, calls=calls)
        print(f"  actor, {calls} call(s) at once:              {rate:9.1f} samples/s ({rate / towers:.2f}x the towers)")
    load.cache_clear()
    why = fp8_ready(device)
    if why:
        print(f"  FP8: skipped ({why})")
        return
    fast = towers_rate(preset, batch, seconds, device, "bfloat16", fp8=True)
    actor = actor_rate(preset, batch, seconds, device, "bfloat16", fp8=True)
    print(f"  FP8 vision trunk: towers {fast:9.1f} samples/s ({fast / towers:.2f}x bf16), actor {actor:9.1f}")
    load.cache_clear()
    reference = load(preset, device, "float32", "float32")
    images = normalize_pixels(torch.from_numpy(host_batch(64, seed=1)["pixels"]))
    try:  # noise images and random weights: a smoke run of the check, not its verdict (real images and weights)
        print(f"  FP8 check on 64 noise images: min cosine {fp8_ops.check_fp8(reference, images):.5f} with float32")
    except fp8_ops.FP8Inexact as e:
        print(f"  FP8 check on 64 noise images: {e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="huge")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.device == "auto":
        print("extract_gpu: no CUDA GPU on this machine, nothing measured (--device cpu --preset tiny: smoke run)")
        return
    report(args.preset, args.batch, args.seconds, device, "bfloat16")


if __name__ == "__main__":
    main()
