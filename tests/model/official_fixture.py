"""Tiny ImageBind-LLM weights in the official layouts (Meta LLaMA + adapter checkpoint), random but well scaled."""

from __future__ import annotations

import json
import math
import os

import torch

from model.llm.config import LLMConfig
from model.llm.convert_adapter import official_shapes
from model.llm.convert_llama import meta_llama_shapes

# 3 layers with the adapter on the last 2: exercises the layer offset of gates and prefix
TINY = LLMConfig(
    vocab_size=96,
    dim=32,
    n_layers=3,
    n_heads=4,
    intermediate_size=96,
    query_layer=2,
    feature_dim=24,
    max_seq_len=64,
    lora_rank=4,
    lora_alpha=4.0,
)
PARAMS = {"dim": 32, "multiple_of": 32, "n_heads": 4, "n_layers": 3, "norm_eps": 1e-6, "vocab_size": -1}


def _random(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "_norm_" in name:
        return 1.0 + 0.2 * torch.randn(shape, generator=g)
    if name.endswith(".gate"):
        return 0.5 * torch.randn(shape, generator=g)
    if name.endswith(("bias",)):
        return 0.1 * torch.randn(shape, generator=g)
    if "tok_embeddings" in name or "prefix_query" in name:
        return torch.randn(shape, generator=g)
    scale = 0.3 if "lora" in name else 1.0
    return scale * torch.randn(shape, generator=g) / math.sqrt(shape[-1])


def official_weights(config: LLMConfig = TINY, seed: int = 0) -> tuple[dict, dict]:
    """(Meta LLaMA state, adapter checkpoint state) with every tensor random."""
    g = torch.Generator().manual_seed(seed)
    llama = {k: _random(k, s, g) for k, s in meta_llama_shapes(config).items()}
    llama["output.weight"] *= 0.5
    adapter = {k: _random(k, s, g) for k, s in official_shapes(config).items()}
    return llama, adapter


def write_meta_llama(directory: str, llama: dict, params: dict = PARAMS) -> str:
    """A Meta release folder: params.json + consolidated.00.pth."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "params.json"), "w") as f:
        json.dump(params, f)
    torch.save(llama, os.path.join(directory, "consolidated.00.pth"))
    return directory


def reference_state(llama: dict, adapter: dict) -> dict:
    """What the reference runs: LLaMA with the adapter's llama.* tensors loaded over it (norms replaced)."""
    state = dict(llama)
    state.update({k.removeprefix("llama."): v for k, v in adapter.items() if k.startswith("llama.")})
    return state
