"""Benchmark: generation tokens/s, the engine vs today's path vs a plain transformers LLaMA, batch 1 and concurrent.

Usage: python -m bench.generate [--preset small|tiny|7b] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16]
       [--batches 1 16] [--new-tokens 64] [--prompt 48] [--plain] [--compile] [--bandwidth-tbs 4.8]

Every weight is random (the speed does not depend on its values); greedy decoding with an EOS outside the
vocabulary, so every request produces exactly --new-tokens tokens. Per batch size it prints tokens/s of:
- `today`: `model.llm.generate.generate_ids` (transformers `generate` through peft LoRA and the o_proj hook);
- `engine`: `model.llm.engine.Engine` (merged LoRA, visual term once per request, static cache; CUDA graphs on
  CUDA), and whether its tokens equal today's (exact in float32; bf16 rounding may flip near-ties);
- with --plain: a transformers LlamaForCausalLM of the same shape, dynamic and static cache (no visual path, no
  LoRA: the reference point the issue quotes);
and, on CUDA, the memory-bandwidth bound of one decode step (weight bytes / bandwidth).
Ratios within one run are the figures to compare; absolute times are noisy on a shared CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from model.llm.config import LLMConfig
from model.llm.engine import Engine
from model.llm.generate import Sampling, generate_ids
from model.llm.model import ImageBindLLM

PRESETS = {
    "tiny": LLMConfig(
        vocab_size=512,
        dim=64,
        n_layers=4,
        n_heads=4,
        intermediate_size=176,
        query_layer=4,
        feature_dim=64,
        max_seq_len=256,
        lora_rank=4,
        lora_alpha=4.0,
    ),
    "small": LLMConfig(
        vocab_size=32000,
        dim=512,
        n_layers=8,
        n_heads=8,
        intermediate_size=1376,
        query_layer=8,
        feature_dim=1024,
        max_seq_len=512,
    ),
    "7b": LLMConfig(),  # LLaMA-7B: 4096 wide, 32 layers, 32 heads, 11008 MLP, 32 adapter layers, LoRA rank 16
}


def build(config: LLMConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ImageBindLLM:
    """An ImageBind-LLM built directly on `device` in `dtype`, every weight random (nonzero gates and LoRA)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ImageBindLLM(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.ndim == 2 and "embed" not in name and "prefix" not in name:
                        p.normal_(0, 1 / math.sqrt(p.shape[-1]))
                    elif name.startswith("gates."):
                        p.normal_(0, 0.5)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> tuple[float, object]:
    """Best wall time of `repeat` runs after one warm-up run, and the last result."""
    out = fn()
    best = math.inf
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def plain_llama(config: LLMConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config.llama_config()).eval()
    finally:
        torch.set_default_dtype(previous)


def measure(
    model: ImageBindLLM,
    config: LLMConfig,
    batch: int,
    greedy: Sampling,
    g: torch.Generator,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> str:
    """One batch size: today's path, the engine, and optionally the plain LLaMA; the line to print."""
    eos = config.vocab_size + 1
    lengths = [max(2, args.prompt - 3 * i) for i in range(batch)]  # ragged
    prompts = [[1, *torch.randint(3, config.vocab_size, (n - 1,), generator=g).tolist()] for n in lengths]
    feats = torch.randn(batch, config.feature_dim, generator=g).to(device)
    with torch.no_grad():
        visual = model.visual_query(feats)  # (B, 1, dim)
    tokens = batch * args.new_tokens
    t_today, today = timed(
        functools.partial(generate_ids, model, prompts, visual, greedy, eos_id=eos), device, args.repeat
    )
    engine = Engine(model, slots=batch, compile=args.compile)
    requests = [{"prompt": p, "visual": visual[i], "sampling": greedy, "eos_id": eos} for i, p in enumerate(prompts)]
    t_engine, fast = timed(functools.partial(engine.generate, requests), device, args.repeat)
    exact = "equal" if fast == today else "differ"
    line = (
        f"batch {batch:3d}: today {tokens / t_today:9.1f} tok/s | engine {tokens / t_engine:9.1f} tok/s "
        f"({t_today / t_engine:.1f}x; tokens {exact} to today's)"
    )
    del engine
    if args.plain:
        plain = plain_llama(config, device, dtype)
        ids = torch.tensor([[0] * (args.prompt - len(p)) + p for p in prompts], device=device)
        mask = (torch.arange(args.prompt)[None] >= torch.tensor([args.prompt - n for n in lengths])[:, None]).to(device)
        common = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
        for name, extra in (("dynamic", {}), ("static", {"cache_implementation": "static"})):
            gen = GenerationConfig(**common, **extra)
            run = functools.partial(plain.generate, input_ids=ids, attention_mask=mask, generation_config=gen)
            t_plain, _ = timed(run, device, args.repeat)
            line += f" | plain {name} {tokens / t_plain:9.1f} tok/s"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=48, help="prompt length of the longest request (others shorter)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="also time a plain transformers LLaMA")
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's decode step")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bandwidth-tbs", type=float, default=4.8, help="the GPU's memory bandwidth (H200: 4.8)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    config = PRESETS[args.preset]
    model = build(config, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.base.parameters())
    print(
        f"preset {args.preset} on {device} in {dtype}: {weights / 1e9:.2f} GB of LLaMA weights; "
        f"{args.new_tokens} new tokens per request, prompts up to {args.prompt} tokens"
    )
    if device.type == "cuda":
        bound = args.bandwidth_tbs * 1e12 / weights
        print(
            f"bandwidth bound of one decode step at {args.bandwidth_tbs} TB/s: {bound:.0f} steps/s "
            f"(= tokens/s at batch 1)"
        )
    greedy = Sampling(temperature=0.0, max_new_tokens=args.new_tokens, max_seq_len=config.max_seq_len)
    g = torch.Generator().manual_seed(0)
    for batch in args.batches:
        print(measure(model, config, batch, greedy, g, args, device, dtype), flush=True)
    print(dataclasses.asdict(config) | {"device": str(device), "dtype": str(dtype)})


if __name__ == "__main__":
    main()
