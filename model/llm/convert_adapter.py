"""The official ImageBind-LLM adapter checkpoint (`7B.pth`) <-> our checkpoint, names, shapes and q/k permutation."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch

from model.llm.checkpoint import read_checkpoint, write_checkpoint
from model.llm.config import LLMConfig
from model.llm.convert_llama import permute_qk, unpermute_qk
from model.llm.model import ImageBindLLM
from model.llm.phases import phase_parameters
from model.weights import CheckpointMismatch, check_state, load_weights_only, read_state_dict, state_dict_of

log = logging.getLogger(__name__)
# What `export_official` records beside the official `model` tensors (the reference reads `model` only): the
# vocabulary size and our checkpoint's metadata, which the official layout has no place for, so a round trip keeps them.
EXPORT_INFO = "ibllm"
RELEASED_VOCAB = 32000  # LLaMA's: the released 7B.pth was trained on it (its tensors do not say)

# official per-layer suffix (after `llama.layers.N.`) <-> ours (after `llama.model.layers.N.`)
_LAYER = {
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.bias": "mlp.gate_proj.bias",
    "feed_forward.w2.bias": "mlp.down_proj.bias",
    "feed_forward.w3.bias": "mlp.up_proj.bias",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LORA_TARGET = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w2": "mlp.down_proj",
    "w3": "mlp.up_proj",
}
for _w, _ours in _LORA_TARGET.items():
    _group = "attention" if _w in ("wq", "wk", "wv", "wo") else "feed_forward"
    _LAYER[f"{_group}.lora_{_w}_l1.weight"] = f"{_ours}.lora_A.weight"
    _LAYER[f"{_group}.lora_{_w}_l2.weight"] = f"{_ours}.lora_B.weight"
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_PERMUTED = ("self_attn.q_proj.bias", "self_attn.q_proj.lora_B.weight", "self_attn.k_proj.lora_B.weight")

_OFFICIAL_LAYER = re.compile(r"^llama\.layers\.(\d+)\.(.+)$")
_OURS_LAYER = re.compile(r"^llama\.model\.layers\.(\d+)\.(.+)$")
_BIND_BLOCK = re.compile(r"^image_bind_(norm|f1|f2|f3)_(\d+)\.weight$")
_OURS_BLOCK = re.compile(r"^bind\.blocks\.(\d+)\.(norm|f1|f2|f3)\.weight$")
_KEEP = re.compile(r"bias|gate|lora|norm")  # what the reference's convert_ckpt.py keeps of `llama.*`


def to_ours(name: str, tensor: torch.Tensor, config: LLMConfig) -> tuple[str, torch.Tensor]:
    """One official tensor -> (our clean name, tensor in our layout)."""
    first = config.n_layers - config.query_layer
    if name in ("image_bind_proj.weight", "image_bind_proj.bias"):
        return "bind.proj." + name.rsplit(".", 1)[1], tensor
    if m := _BIND_BLOCK.match(name):
        return f"bind.blocks.{int(m[2]) - 1}.{m[1]}.weight", tensor
    if name == "prefix_query.weight":
        return name, tensor
    if name == "llama.norm.weight":
        return "llama.model.norm.weight", tensor
    if m := _OFFICIAL_LAYER.match(name):
        layer, rest = int(m[1]), m[2]
        if rest == "attention.gate":
            return f"gates.{layer - first}", tensor.reshape(-1)
        if rest in _LAYER:
            ours = _LAYER[rest]
            heads = config.n_heads if "q_proj" in ours else config.kv_heads
            return f"llama.model.layers.{layer}.{ours}", permute_qk(tensor, heads) if ours in _PERMUTED else tensor
    raise CheckpointMismatch(f"unexpected tensor {name!r} in an ImageBind-LLM adapter checkpoint")


def to_official(name: str, tensor: torch.Tensor, config: LLMConfig) -> tuple[str, torch.Tensor]:
    """One of our tensors (clean name) -> (official name, tensor in the official layout); inverse of `to_ours`."""
    first = config.n_layers - config.query_layer
    if name.startswith("bind.proj."):
        return "image_bind_proj." + name.rsplit(".", 1)[1], tensor
    if m := _OURS_BLOCK.match(name):
        return f"image_bind_{m[2]}_{int(m[1]) + 1}.weight", tensor
    if name == "prefix_query.weight":
        return name, tensor
    if name.startswith("gates."):
        return f"llama.layers.{int(name.split('.')[1]) + first}.attention.gate", tensor.reshape(1, -1, 1, 1)
    if name == "llama.model.norm.weight":
        return "llama.norm.weight", tensor
    if (m := _OURS_LAYER.match(name)) and m[2] in _LAYER_BACK:
        heads = config.n_heads if "q_proj" in m[2] else config.kv_heads
        out = unpermute_qk(tensor, heads) if m[2] in _PERMUTED else tensor
        return f"llama.layers.{m[1]}.{_LAYER_BACK[m[2]]}", out
    raise CheckpointMismatch(f"{name!r} has no counterpart in the official ImageBind-LLM checkpoint")


def official_shapes(config: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Official name -> shape of every tensor an adapter checkpoint of this config holds (our model, on meta)."""
    with torch.device("meta"):
        model = ImageBindLLM(config)
    return {
        official: tuple(t.shape)
        for official, t in (to_official(n, p, config) for n, p in phase_parameters(model).items())
    }


def strip_training_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the reference's convert_ckpt.py keeps of a full training checkpoint (released files are already so)."""
    kept = {
        k: v
        for k, v in state.items()
        if not k.startswith("image_bind.") and (not k.startswith("llama.") or _KEEP.search(k))
    }
    if len(kept) != len(state):
        dropped = len(state) - len(kept)
        log.info("dropped %d frozen tensors (ImageBind, LLaMA base weights) of a full checkpoint", dropped)
    return kept


def infer_config(state: Mapping[str, torch.Tensor], vocab_size: int = 32000, origin: str = "checkpoint") -> LLMConfig:
    """The shapes of an official adapter checkpoint, read off its tensors (the vocabulary is not in it)."""
    try:
        prefix = state["prefix_query.weight"]
        n_layers = 1 + max(int(m[1]) for k in state if (m := _OFFICIAL_LAYER.match(k)))
        gate = state[f"llama.layers.{n_layers - 1}.attention.gate"]
        w1_bias = state[f"llama.layers.{n_layers - 1}.feed_forward.w1.bias"]
        rank = state[f"llama.layers.{n_layers - 1}.attention.lora_wq_l1.weight"].shape[0]
        feature_dim = state["image_bind_proj.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise CheckpointMismatch(f"{origin}: not an ImageBind-LLM adapter checkpoint (no {e})") from None
    blocks = sum(1 for k in state if k.startswith("image_bind_norm_"))
    return LLMConfig(
        vocab_size=vocab_size,
        dim=prefix.shape[1],
        n_layers=n_layers,
        n_heads=gate.numel(),
        intermediate_size=w1_bias.shape[0],
        query_layer=prefix.shape[0],
        feature_dim=feature_dim,
        bind_blocks=blocks,
        lora_rank=rank,
        lora_alpha=float(rank),
    )


def official_to_ours(
    state: Mapping[str, torch.Tensor], config: LLMConfig, origin: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """All tensors of an official adapter checkpoint -> ours (clean names), refusing missing/extra/mis-shaped keys."""
    state = strip_training_state(state)
    check_state(official_shapes(config), state, origin, "an ImageBind-LLM adapter of this shape")
    return dict(to_ours(k, v, config) for k, v in state.items())


def ours_to_official(tensors: Mapping[str, torch.Tensor], config: LLMConfig) -> dict[str, torch.Tensor]:
    """Our checkpoint tensors -> the official layout (the inverse of `official_to_ours`)."""
    return dict(to_official(k, v, config) for k, v in tensors.items())


def convert_official_adapter(path: str, directory: str, vocab_size: int | None = None) -> str:
    """The released adapter file (e.g. `7B.pth`, read with weights_only) -> our checkpoint directory. The vocabulary
    is `vocab_size`, else what `export_official` recorded in the file, else LLaMA's 32000; so is the metadata."""
    state, info = _read_release(path)
    state = strip_training_state(state)
    vocab = vocab_size or info.get("vocab_size") or RELEASED_VOCAB
    config = infer_config(state, vocab, origin=path)
    tensors = official_to_ours(state, config, origin=path)
    metadata = {**(info.get("metadata") or {}), "converted_from": os.path.abspath(path)}
    return write_checkpoint(directory, config, tensors, metadata)


def _read_release(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of an adapter file, read once, and what `export_official` recorded beside them (empty for a
    released file or a .safetensors one)."""
    if not path.endswith((".pth", ".pt")) or not os.path.isfile(path):
        return read_state_dict(path), {}
    doc = load_weights_only(path)
    info = doc.get(EXPORT_INFO) if isinstance(doc, Mapping) else None
    return state_dict_of(doc, path), dict(info) if isinstance(info, Mapping) else {}


def export_official(directory: str, path: str) -> str:
    """Our checkpoint directory -> a file in the official layout (`{"model": {...}}`, loadable by the reference), with
    its vocabulary size and metadata beside (EXPORT_INFO); missing parent folders are made."""
    config, tensors, doc = read_checkpoint(directory)
    state = {k: v.contiguous() for k, v in ours_to_official(tensors, config).items()}
    info = {"vocab_size": config.vocab_size, "metadata": doc.get("metadata") or {}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"model": state, EXPORT_INFO: info}, tmp)
    os.replace(tmp, path)
    return path
