"""Ground-truth fp32 forward of Meta-layout LLaMA with ImageBind-LLM's biases, LoRA and visual adapter (spec 3.4)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight


def _linear(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, lora: bool = True) -> torch.Tensor:
    """`name` = e.g. `layers.0.attention.wq`: weight, optional bias, optional LoRA l2(l1(x)) without scaling."""
    y = F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))
    module, _, leaf = name.rpartition(".")
    l1 = sd.get(f"{module}.lora_{leaf}_l1.weight")
    if lora and l1 is not None:
        y = y + F.linear(F.linear(x, l1), sd[f"{module}.lora_{leaf}_l2.weight"])
    return y


def _rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Meta's rotary embedding: pairs (2i, 2i+1) of each head as complex numbers times e^(i*pos*freq_i)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B,L,H,hd/2)
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)


def meta_forward(
    state: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    *,
    n_heads: int,
    norm_eps: float = 1e-6,
    rope_theta: float = 1e4,
    visual_query: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    query_layer: int | None = None,
    adapter_lora: bool = False,
) -> torch.Tensor:
    """Logits (B,L,V) in fp32 for `tokens` (B,L); the adapter is used when `visual_query` (B,1,dim) is given.

    `adapter_lora=True` is a trap, for negative tests: the adapter's value through wv WITH its LoRA.
    """
    sd = {k: v.float() for k, v in state.items()}
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    bsz, seq = tokens.shape
    h = sd["tok_embeddings.weight"][tokens]
    dim = h.shape[-1]
    hd = dim // n_heads
    freqs = 1.0 / rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(seq).float(), freqs)
    cis = torch.polar(torch.ones_like(angles), angles)  # (L, hd/2)
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    n_adapter = (query_layer or n_layers) if visual_query is not None else 0
    first_adapter = n_layers - n_adapter
    if visual_query is not None and prefix is not None and prefix.shape[0] != n_adapter:
        raise ValueError(f"prefix has {prefix.shape[0]} rows for {n_adapter} adapter layers")

    for i in range(n_layers):
        att, ffn = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        x = _rms_norm(h, sd[f"layers.{i}.attention_norm.weight"], norm_eps)
        q = _rope(_linear(sd, f"{att}.wq", x).view(bsz, seq, n_heads, hd), cis).transpose(1, 2)
        k = _rope(_linear(sd, f"{att}.wk", x).view(bsz, seq, n_heads, hd), cis).transpose(1, 2)
        v = _linear(sd, f"{att}.wv", x).view(bsz, seq, n_heads, hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + mask
        o = torch.softmax(scores.float(), dim=-1) @ v  # (B,H,L,hd)
        if i >= first_adapter:
            adapter = visual_query.float()
            if prefix is not None:
                adapter = adapter + prefix[i - first_adapter].float()
            a_v = _linear(sd, f"{att}.wv", adapter, lora=adapter_lora).view(bsz, 1, n_heads, hd).transpose(1, 2)
            o = o + sd[f"{att}.gate"].tanh() * a_v  # gate (1,H,1,1), broadcast to every position
        h = h + _linear(sd, f"{att}.wo", o.transpose(1, 2).reshape(bsz, seq, dim))
        x = _rms_norm(h, sd[f"layers.{i}.ffn_norm.weight"], norm_eps)
        u = F.silu(_linear(sd, f"{ffn}.w1", x)) * _linear(sd, f"{ffn}.w3", x)
        h = h + _linear(sd, f"{ffn}.w2", u)
    return F.linear(_rms_norm(h, sd["norm.weight"], norm_eps), sd["output.weight"])


def meta_visual(state: Mapping[str, torch.Tensor], features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The reference's `forward_visual` for one modality of weight 1, no cache (spec 3.3): (B, D) -> (B, 1, dim)."""
    sd = {k: v.float() for k, v in state.items()}
    v = F.normalize(features.float(), dim=-1) * (1.0 / (1.0 + 1e-6))
    x = F.linear(v.unsqueeze(1), sd["image_bind_proj.weight"], sd["image_bind_proj.bias"])
    j = 1
    while f"image_bind_norm_{j}.weight" in sd:
        n = _rms_norm(x, sd[f"image_bind_norm_{j}.weight"], eps)
        gated = F.silu(F.linear(n, sd[f"image_bind_f1_{j}.weight"])) * F.linear(n, sd[f"image_bind_f3_{j}.weight"])
        x = x + F.linear(gated, sd[f"image_bind_f2_{j}.weight"])
        j += 1
    return x
