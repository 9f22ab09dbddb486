"""Shape of an ImageBind-LLM: the LLaMA it wraps, the bind network and adapter sizes, LoRA; presets 7B and tiny."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import LlamaConfig


@dataclass(frozen=True)
class LLMConfig:
    """Every size ImageBindLLM needs; `llama_config()` is the transformers config of its language model."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (LLaMA-1); the adapter needs it equal to n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    feature_dim: int = 1024  # ImageBind's joint embedding
    query_layer: int = 32  # the last `query_layer` layers receive the visual adapter
    bind_blocks: int = 3
    lora_rank: int = 16
    lora_alpha: float = 16.0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0  # the reference pads with 0 and ignores label 0
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes kept in config.json

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if not 0 < self.query_layer <= self.n_layers:
            raise ValueError(f"query_layer {self.query_layer} must be in 1..n_layers ({self.n_layers})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def adapter_layers(self) -> range:
        """Indices of the layers that get the visual adapter (the last `query_layer`)."""
        return range(self.n_layers - self.query_layer, self.n_layers)

    def llama_config(self) -> LlamaConfig:
        """transformers' config: q/k/v/o and MLP biases on (k/v held at zero), rope theta, eps, vocab."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(self.max_seq_len, 2048),
            rms_norm_eps=self.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_bias=True,
            mlp_bias=True,
            bos_token_id=self.bos_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> LLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{origin}: unknown ImageBind-LLM config fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_meta_params(cls, params: dict[str, Any], vocab_size: int | None = None, **overrides: Any) -> LLMConfig:
        """From Meta's `params.json` (dim, n_layers, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, ...)."""
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise ValueError("params.json has vocab_size -1: give the tokenizer's vocabulary size")
            vocab = vocab_size
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads"),
            intermediate_size=meta_ffn_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-6)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            query_layer=n_layers,
            **overrides,
        )


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's FeedForward hidden size: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


PRESETS: dict[str, LLMConfig] = {
    "7B": LLMConfig(),
    # the structure of 7B at toy widths: tests and the demo (vocab is the demo tokenizer's, set when it is trained)
    "tiny": LLMConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=192, query_layer=2, max_seq_len=256
    ),
}


def config_from_llama(hf: LlamaConfig, **overrides: Any) -> LLMConfig:
    """Our config for a transformers LLaMA config (a base model's config.json); adapter sizes from `overrides`."""
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0) or 10000.0))
    kv = getattr(hf, "num_key_value_heads", None)
    fields = dict(
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=None if kv in (None, hf.num_attention_heads) else kv,
        intermediate_size=hf.intermediate_size,
        norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        query_layer=hf.num_hidden_layers,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )
    for name, attr in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        value = getattr(hf, attr, None)
        if isinstance(value, int):
            fields[name] = value
    fields.update(overrides)
    return LLMConfig(**fields)
