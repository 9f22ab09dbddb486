"""A tiny ImageBind-LLM with every weight random and well scaled, and visual queries for it (generation tests)."""

from __future__ import annotations

import math

import torch

from model.llm.config import LLMConfig
from model.llm.model import ImageBindLLM
from tests.model.official_fixture import TINY


def random_model(config: LLMConfig = TINY, seed: int = 0, lora: bool = True) -> ImageBindLLM:
    """Every weight random and well scaled (clear argmax margins): nonzero gates, bind net, prefix, LoRA, biases."""
    model = ImageBindLLM(config, lora=lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("k_proj.bias", "v_proj.bias")) and "lora" not in name:
                continue  # held at zero by the model (the reference has no k/v bias)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or name.startswith("gates."):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2 and "embed_tokens" not in name and "prefix_query" not in name:
                scale = 0.3 if "lora_" in name else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    assert all(bool((gate != 0).all()) for gate in model.gates)
    return model.eval()


def visual_for(model: ImageBindLLM, b: int, seed: int = 1) -> torch.Tensor:
    """(b, 1, dim) bound visual queries of random features."""
    feats = torch.randn(b, model.config.feature_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.visual_query(feats)
