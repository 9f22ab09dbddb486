"""Benchmark (CUDA only): extraction and training at real shapes against the measured bf16 matmul peak, one run.

Usage: python -m bench.gpu [--seconds 6] [--steps 12] [--skip-train] [--skip-extract]
Prints, on one GPU, in about 6 minutes on an H200 (model builds included):
- the bf16 matmul peak (8192^3), the yardstick of every percentage below;
- extraction: ImageBind-Huge's two towers at batch 256 over float32 weights with bf16 autocast and over bf16
  weights, the extraction actor (`Encoder`: uint8 pixels and token ids in host memory, float16 columns out)
  against the bf16 towers, FP8 where torchao and the GPU allow it; the Ray pipeline when ray is importable;
- training at the 7B shape: stage 1 (micro-batch 32 x 80, then 64 x 80) and stage 2 (4 x 512) with the frozen
  base in float32 (autocast) and in bfloat16, fused kernels when Liger is installed; share of the matmul peak
  (4 x 6.7 GFLOP a token: the frozen base's forward and the backward through its activations), peak memory, and
  the largest gap between the float32-base and bf16-base losses over the same steps;
- FSDP over nccl at world size 1: one sharded training step whose loss equals the unsharded model's.
Without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import time

import torch

PEAK_N = 8192
GFLOP_PER_TOKEN_7B = 4 * 6.7  # forward of the frozen base + the backward through its activations, per token


def matmul_peak(n: int = PEAK_N, seconds: float = 3.0) -> float:
    """Measured dense bf16 matmul TFLOP/s on n x n x n."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        count += 10
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def extraction(seconds: float) -> None:
    """The towers alone (autocast vs bf16 weights), the actor against them, FP8, and the Ray pipeline if it can."""
    from bench.extract_gpu import actor_rate, fp8_ready, towers_rate

    autocast = towers_rate("huge", 256, seconds, weights="float32")
    cast = towers_rate("huge", 256, seconds, weights="auto")
    actor = actor_rate("huge", 256, seconds)
    print(f"  towers, fp32 weights + bf16 autocast: {autocast:8.1f} samples/s")
    print(f"  towers, bf16 weights:                 {cast:8.1f} samples/s ({cast / autocast:.2f}x autocast)")
    print(
        f"  extraction actor (host batches):      {actor:8.1f} samples/s ({actor / cast:.2f}x the towers; "
        "target >= 1,150 and 0.96x)"
    )
    why = fp8_ready("cuda")
    if why:
        print(f"  FP8 vision trunk: not run ({why})")
    else:
        fp8 = towers_rate("huge", 256, seconds, fp8=True)
        print(f"  towers, FP8 vision trunk:             {fp8:8.1f} samples/s (target: vision >= 1,800 images/s)")
    if importlib.util.find_spec("ray") is None:
        print("  Ray pipeline: ray is not installed here; bench/extract.py measures it against the actor")
    else:
        print("  Ray pipeline: run `python -m bench.extract --device cuda` on this machine for its ratio")


def training(steps: int, peak: float) -> None:
    """Stage 1 and stage 2 at the 7B shape: float32 vs bfloat16 frozen base, fused kernels, larger micro-batch."""
    from bench.train_gpu import step_rate

    runs = [  # (stage, micro-batch, sequence, base dtype, label)
        (1, 32, 80, "float32", "stage 1, 32 x 80, fp32 base + autocast"),
        (1, 32, 80, "bfloat16", "stage 1, 32 x 80, bf16 base"),
        (1, 64, 80, "bfloat16", "stage 1, 64 x 80, bf16 base"),
        (2, 4, 512, "float32", "stage 2, 4 x 512, fp32 base + autocast"),
        (2, 4, 512, "bfloat16", "stage 2, 4 x 512, bf16 base"),
    ]
    losses: dict[tuple[int, int, int], dict[str, list[float]]] = {}
    for stage, mb, seq, base, label in runs:
        r = step_rate(stage=stage, shape="7b", micro_batch=mb, seq=seq, base_dtype=base, steps=steps, device="cuda")
        losses.setdefault((stage, mb, seq), {})[base] = r["losses"]
        share = r["tokens_per_s"] * GFLOP_PER_TOKEN_7B / 1e3 / peak
        print(
            f"  {label:<40} {r['ms_per_step']:7.1f} ms/step, {r['samples_per_s']:7.1f} samples/s, "
            f"{r['tokens_per_s']:8.0f} tokens/s, {share:.0%} of the peak, {r['peak_memory_gb']:.1f} GB peak"
            f"{', fused kernels' if r['fused'] else ''}"
        )
        torch.cuda.empty_cache()
    for (stage, mb, seq), by_base in losses.items():
        if {"float32", "bfloat16"} <= set(by_base):
            gap = max(abs(a - b) for a, b in zip(by_base["float32"], by_base["bfloat16"], strict=True))
            print(
                f"  stage {stage} {mb} x {seq}: losses of the bf16 base vs the fp32 base over {steps} steps differ "
                f"by at most {gap:.4f}"
            )
    print("  targets: stage 1 >= 45% and stage 2 >= 40% of the measured peak")


def fsdp_world_one() -> None:
    """One FSDP-sharded training step over nccl at world size 1: its loss equals the unsharded model's."""
    import torch.distributed as dist

    from bench.train_gpu import synthetic_steps
    from model.llm.config import LLMConfig
    from model.llm.model import ImageBindLLM
    from pipelines.train.parallel import shard_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        config = LLMConfig.preset("tiny")
        (micro,) = next(synthetic_steps(config, 4, 32, 0.5))
        losses = []
        for sharded in (False, True):
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = ImageBindLLM(config)
            if sharded:
                model = shard_model(model, torch.device("cuda"), 1)
            loss = model(micro.input_ids.cuda(), micro.features.cuda(), micro.labels.cuda(), sum_loss=True).loss
            loss.backward()
            losses.append(loss.detach().item())
        print(
            f"  FSDP (nccl, world size 1): loss {losses[1]:.6f}, unsharded {losses[0]:.6f}, "
            f"difference {abs(losses[1] - losses[0]):.2e}"
        )
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per extraction figure")
    p.add_argument("--steps", type=int, default=12, help="training steps per configuration (2 warm-up)")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench/gpu.py measures a CUDA GPU and there is none here (torch.cuda.is_available() is False); "
            "bench/extract_gpu.py and bench/train_gpu.py run their code on the CPU at tiny shapes",
            file=sys.stderr,
        )
        sys.exit(2)
    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    peak = matmul_peak()
    print(f"bf16 matmul peak ({PEAK_N}^3): {peak:.0f} TFLOP/s")
    if not args.skip_extract:
        print("extraction (ImageBind-Huge, batch 256, random weights)")
        extraction(args.seconds)
        torch.cuda.empty_cache()
    if not args.skip_train:
        print("training (7B shape, random weights)")
        training(args.steps, peak)
    print("FSDP")
    fsdp_world_one()
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
