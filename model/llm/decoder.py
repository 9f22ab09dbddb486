"""The serving copy of an ImageBind-LLM's LLaMA: LoRA merged, projections fused, a static KV cache in request slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.llm.model import ImageBindLLM


def effective_weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in fp32 of a projection as its forward computes it: base + every active LoRA delta merged."""
    base = getattr(linear, "base_layer", linear)
    weight = base.weight.detach().float()
    for name in getattr(linear, "active_adapters", ()):
        if name in getattr(linear, "lora_A", {}):
            if getattr(linear, "fan_in_fan_out", False):
                raise ValueError("fan_in_fan_out LoRA layers are not LLaMA's: cannot merge")
            a, b = linear.lora_A[name].weight.detach().float(), linear.lora_B[name].weight.detach().float()
            weight = weight + (b @ a) * linear.scaling[name]
    bias = None if base.bias is None else base.bias.detach().float()
    return weight, bias


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op: fp32 statistics, cast back, then the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Decoder:
    """A frozen LLaMA for generation, built from an ImageBindLLM and equal to it up to float rounding.

    - Every projection has its LoRA merged (fp32 merge, then cast); q/k/v and gate/up are fused into one matmul.
    - The visual adapter's per-layer term, `tanh(gate_i) * base_v_i(visual + prefix_i)`, is computed once per
      request (`visual_terms`, with the unmerged base v_proj) and held per slot in `vis`: every step adds it to
      the attention output before o_proj, as the model's hook does.
    - The KV cache is static: (layers, slots, heads, max_len, head_dim); a request owns one slot and its tokens sit
      at their positions 0..n-1, so ragged requests need no padding in the cache.
    """

    def __init__(
        self,
        model: ImageBindLLM,
        slots: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        cfg = model.config
        base = model.base
        device = torch.device(device) if device is not None else next(model.parameters()).device
        dtype = dtype or base.model.embed_tokens.weight.dtype
        self.dtype, self.eps, self.heads, self.head_dim = dtype, cfg.norm_eps, cfg.n_heads, cfg.head_dim
        self.dim, self.slots, self.max_len, self.n_layers = cfg.dim, slots, max_len, cfg.n_layers
        self.first_adapter = cfg.n_layers - cfg.query_layer

        def keep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

        self.embed = keep(base.model.embed_tokens.weight)
        self.norm = keep(base.model.norm.weight)
        self.lm_head = keep(base.lm_head.weight)
        self.inv_freq = base.model.rotary_emb.inv_freq.detach().to(device=device, dtype=torch.float32)
        self.layers: list[dict[str, torch.Tensor | None]] = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [effective_weight(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            gate_up = [effective_weight(p) for p in (mlp.gate_proj, mlp.up_proj)]
            o, down = effective_weight(attn.o_proj), effective_weight(mlp.down_proj)
            self.layers.append(
                {
                    "ln1": keep(layer.input_layernorm.weight),
                    "ln2": keep(layer.post_attention_layernorm.weight),
                    "wqkv": keep(torch.cat([w for w, _ in qkv])),
                    "bqkv": _cat_bias(qkv, keep),
                    "wo": keep(o[0]),
                    "bo": keep(o[1]),
                    "wgu": keep(torch.cat([w for w, _ in gate_up])),
                    "bgu": _cat_bias(gate_up, keep),
                    "wd": keep(down[0]),
                    "bd": keep(down[1]),
                }
            )
        # the visual path: the unmerged base v_proj of each adapter layer, the prefix queries and the gates
        v_base = [
            getattr(base.model.layers[i].self_attn.v_proj, "base_layer", base.model.layers[i].self_attn.v_proj)
            for i in cfg.adapter_layers
        ]
        self.v_weight = torch.stack([keep(v.weight) for v in v_base])  # (Lq, dim, dim)
        self.v_bias = None if v_base[0].bias is None else torch.stack([keep(v.bias) for v in v_base])
        self.prefix = model.prefix_query.weight.detach().to(device)  # (Lq, dim) kept in the model's dtype
        self.gates = torch.stack([g.detach() for g in model.gates]).to(device)  # (Lq, H)
        shape = (cfg.n_layers, slots, cfg.n_heads, max_len, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.vis = torch.zeros((cfg.query_layer, slots, cfg.dim), device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.no_grad()
    def visual_terms(self, visual: torch.Tensor) -> torch.Tensor:
        """(B, dim) bound visual queries -> (Lq, B, dim) the per-layer terms added before o_proj (the model's hook)."""
        out = []
        for i in range(self.v_weight.shape[0]):
            adapter = visual.to(self.device) + self.prefix[i].to(visual.dtype)
            value = F.linear(adapter.to(self.dtype), self.v_weight[i], None if self.v_bias is None else self.v_bias[i])
            gate = torch.tanh(self.gates[i]).to(value.dtype).repeat_interleave(self.head_dim)
            out.append(value * gate)
        return torch.stack(out)

    def set_visual(self, slot: int, terms: torch.Tensor | None) -> None:
        """Hold a request's visual terms (Lq, dim) in its slot; None = text only (zeros: adds nothing)."""
        if terms is None:
            self.vis[:, slot].zero_()
        else:
            self.vis[:, slot].copy_(terms)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _mlp(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        h = _rms(x, layer["ln2"], self.eps)
        gate, up = F.linear(h, layer["wgu"], layer["bgu"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer["wd"], layer["bd"])

    def _qkv(self, layer: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, t, _ = x.shape
        qkv = F.linear(_rms(x, layer["ln1"], self.eps), layer["wqkv"], layer["bqkv"])
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in qkv.split(self.dim, dim=-1))
        cos, sin = cos[:, None], sin[:, None]  # (b, 1, t, hd)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _attend_out(
        self, layer: dict, index: int, x: torch.Tensor, attn: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        b, _, t, _ = attn.shape
        attn = attn.transpose(1, 2).reshape(b, t, self.dim)
        if index >= self.first_adapter:
            attn = attn + self.vis[index - self.first_adapter, slots][:, None, :]
        return x + F.linear(attn, layer["wo"], layer["bo"])

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts (b, T) into their slots' cache; logits (b, vocab) after each last real token."""
        b, t = tokens.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        cos, sin = self._rope(positions)
        x = F.embedding(tokens, self.embed)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[index, slots, :, :t] = k
            self.v_cache[index, slots, :, :t] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = self._mlp(layer, self._attend_out(layer, index, x, attn, slots))
        last = x[torch.arange(b, device=self.device), lengths - 1]
        return F.linear(_rms(last, self.norm, self.eps), self.lm_head)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """One token for every slot at its position (S,): logits (S, vocab). Attention reads the first `span`
        cached positions (all of them by default: static shapes, for CUDA graphs)."""
        span = span or self.max_len
        slots = torch.arange(self.slots, device=self.device)
        cos, sin = self._rope(positions[:, None])
        mask = (torch.arange(span, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        x = F.embedding(tokens[:, None], self.embed)
        # row of each (slot, head) at its position in a layer's cache viewed as (slots * heads * max_len, head_dim)
        rows = (
            (slots[:, None] * self.heads + torch.arange(self.heads, device=self.device)) * self.max_len
            + positions[:, None]
        ).reshape(-1)
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            self.k_cache[index].view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            self.v_cache[index].view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            keys, values = self.k_cache[index, :, :, :span], self.v_cache[index, :, :, :span]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = self._mlp(layer, self._attend_out(layer, index, x, attn, slots))
        return F.linear(_rms(x[:, 0], self.norm, self.eps), self.lm_head)


def _cat_bias(parts: list[tuple[torch.Tensor, torch.Tensor | None]], keep) -> torch.Tensor | None:
    if all(b is None for _, b in parts):
        return None
    return keep(torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]))
