"""Meta-format LLaMA (params.json + consolidated.NN.pth) to a Hugging Face transformers LLaMA directory."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.llm.config import LLMConfig
from model.weights import replace_dir

# Meta's model parallelism (fairscale): column-parallel outputs split on dim 0, row-parallel inputs (and
# ParallelEmbedding's embedding dim) on dim 1, everything else (RMSNorm weights) replicated.
_COLUMN_PARALLEL = frozenset({"wq", "wk", "wv", "w1", "w3", "output"})
_ROW_PARALLEL = frozenset({"wo", "w2", "tok_embeddings"})
_IGNORED_META = frozenset({"rope.freqs"})  # LLaMA-1's precomputed rotary buffer; recomputed by transformers

_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
_MAX_LISTED = 12


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF row order of a q or k projection output (dim 0): HF row `a*(hd/2)+j` = Meta row `2j+a` per head."""
    hd = _head_dim(w, n_heads)
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta row order of a q or k projection output (dim 0); the inverse of `permute_qk`."""
    hd = _head_dim(w, n_heads)
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _head_dim(w: torch.Tensor, n_heads: int) -> int:
    if w.ndim == 0 or n_heads <= 0 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(f"q/k permutation: {tuple(w.shape)} has dim 0 not split into {n_heads} heads of even size")
    return w.shape[0] // n_heads


def meta_to_hf_name(key: str) -> str:
    """The transformers LlamaForCausalLM name of a Meta LLaMA weight or bias (`layers.3.attention.wq.bias` ...)."""
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    module, _, leaf = key.rpartition(".")
    if module in _TOP_NAMES and leaf in ("weight", "bias"):
        return f"{_TOP_NAMES[module]}.{leaf}"
    raise ValueError(f"{key!r} is not a Meta LLaMA weight name")


def hf_to_meta_name(key: str) -> str:
    """The Meta LLaMA name of a transformers LlamaForCausalLM weight or bias; inverse of `meta_to_hf_name`."""
    m = _HF_LAYER_KEY.match(key)
    if m:
        for meta, hf in _LAYER_NAMES.items():
            if m.group(2) == hf:
                return f"layers.{m.group(1)}.{meta}.{m.group(3)}"
    module, _, leaf = key.rpartition(".")
    for meta, hf in _TOP_NAMES.items():
        if module == hf and leaf in ("weight", "bias"):
            return f"{meta}.{leaf}"
    raise ValueError(f"{key!r} is not a transformers LLaMA weight name")


def meta_llama_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a base Meta LLaMA checkpoint for `cfg` and its shape, in checkpoint order."""
    d, ffn, kv = cfg.dim, cfg.intermediate_size, cfg.kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (d, d),
            p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d),
            p + "attention.wo.weight": (d, d),
            p + "feed_forward.w1.weight": (ffn, d),
            p + "feed_forward.w2.weight": (d, ffn),
            p + "feed_forward.w3.weight": (ffn, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        }
    shapes |= {"norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    return shapes


def _listed(items: list[str]) -> str:
    more = f", ... {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_shapes(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], cfg: LLMConfig, origin: str
) -> None:
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = [f"{k} {shapes[k]} (want {want})" for k, want in expected.items() if k in shapes and shapes[k] != want]
    problems = [
        f"{len(keys)} {what}: {_listed(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        size = (
            f"vocab {cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
            f"({cfg.kv_heads} kv), ffn {cfg.intermediate_size}"
        )
        raise ValueError(f"{origin}: does not match LLaMA with {size}: " + "; ".join(problems))


def _tensor_shapes(state: Mapping[str, Any], origin: str, ignored: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    skip = set(ignored)
    bad = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{origin}: {len(bad)} values are not tensors: {_listed(bad)}")
    return {k: tuple(v.shape) for k, v in state.items() if k not in skip}


def _to_hf(key: str, t: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    if key.endswith("attention.wq.weight"):
        return permute_qk(t, cfg.n_heads)
    if key.endswith("attention.wk.weight"):
        return permute_qk(t, cfg.kv_heads)
    return t


def meta_to_hf_state(
    state: Mapping[str, torch.Tensor], cfg: LLMConfig, *, origin: str = "Meta LLaMA state"
) -> dict[str, torch.Tensor]:
    """Meta LLaMA weights -> LlamaForCausalLM state_dict names, q/k rows permuted; strict about keys and shapes."""
    shapes = _tensor_shapes(state, origin, _IGNORED_META)
    expected = meta_llama_shapes(cfg)
    _check_shapes(shapes, expected, cfg, origin)
    return {meta_to_hf_name(k): _to_hf(k, state[k], cfg) for k in expected}


def hf_to_meta_state(
    state: Mapping[str, torch.Tensor], cfg: LLMConfig, *, origin: str = "transformers LLaMA state"
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM weights -> Meta LLaMA names, q/k rows un-permuted; the inverse of `meta_to_hf_state`."""
    ignored = [k for k in state if k.endswith("rotary_emb.inv_freq")]
    shapes = _tensor_shapes(state, origin, ignored)
    expected = {meta_to_hf_name(k): s for k, s in meta_llama_shapes(cfg).items()}
    _check_shapes(shapes, expected, cfg, origin)
    out: dict[str, torch.Tensor] = {}
    for key in expected:
        meta, t = hf_to_meta_name(key), state[key]
        if meta.endswith("attention.wq.weight"):
            t = unpermute_qk(t, cfg.n_heads)
        elif meta.endswith("attention.wk.weight"):
            t = unpermute_qk(t, cfg.kv_heads)
        out[meta] = t
    return out


# ----------------------------------------------------------------------------------------------- reading Meta files


def read_meta_params(src_dir: str | Path) -> dict[str, Any]:
    """Meta's `params.json` (dim, n_layers, n_heads, multiple_of, norm_eps, vocab_size, ...) from `src_dir`."""
    path = Path(src_dir) / "params.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing; a Meta LLaMA directory has params.json next to consolidated.00.pth")
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(params).__name__}")
    absent = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if absent:
        raise ValueError(f"{path}: missing fields {absent}")
    return params


def _shard_files(src: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in src.glob("consolidated.*.pth") if (m := _SHARD_NAME.match(p.name))}
    if not found:
        raise ValueError(f"{src}: no consolidated.*.pth checkpoint files")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{src}: model-parallel shards are not numbered 00..{len(found) - 1:02d}: {sorted(found)}")
    return [found[i] for i in range(len(found))]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError for non-tensor pickles, RuntimeError for legacy/corrupt archives
        raise ValueError(f"{path}: not a plain tensor checkpoint loadable with weights_only=True ({e})") from e
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path}: expected a dict of name -> tensor, got {type(obj).__name__}")
    _tensor_shapes(obj, str(path))
    return obj


def _merge_dim(key: str) -> int | None:
    parts = key.split(".")
    if len(parts) < 2:
        return None
    module, leaf = parts[-2], parts[-1]
    if module in _COLUMN_PARALLEL and leaf in ("weight", "bias"):
        return 0
    if module in _ROW_PARALLEL and leaf == "weight":
        return 1
    return None  # replicated on every shard: take shard 0


class _MetaShards:
    """The model-parallel shards of a Meta checkpoint, memory-mapped, merged one tensor at a time."""

    def __init__(self, src: Path) -> None:
        self.files = _shard_files(src)
        self.shards = [_load_shard(f) for f in self.files]
        first = [k for k in self.shards[0] if k not in _IGNORED_META]
        for f, shard in zip(self.files[1:], self.shards[1:], strict=True):
            diff = sorted(set(shard).symmetric_difference(self.shards[0]))
            if diff:
                raise ValueError(f"{f}: keys differ from {self.files[0].name}: {_listed(diff)}")
        self.shapes = {k: self._merged_shape(k) for k in first}

    @property
    def origin(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0]} (+{len(self.files) - 1} shards)"

    def _merged_shape(self, key: str) -> tuple[int, ...]:
        shapes = [tuple(s[key].shape) for s in self.shards]
        dim = _merge_dim(key) if len(shapes) > 1 else None
        if dim is None or len(shapes[0]) <= dim:
            bad = [f.name for f, s in zip(self.files, shapes, strict=True) if s != shapes[0]]
            if bad:
                raise ValueError(f"{key}: replicated tensor has different shapes in {bad} than {self.files[0].name}")
            return shapes[0]
        rest = [s[:dim] + s[dim + 1 :] for s in shapes]
        bad = [f.name for f, r in zip(self.files, rest, strict=True) if r != rest[0]]
        if bad:
            raise ValueError(f"{key}: shards {bad} do not concatenate on dim {dim} with {self.files[0].name}")
        return (*shapes[0][:dim], sum(s[dim] for s in shapes), *shapes[0][dim + 1 :])

    def tensor(self, key: str) -> torch.Tensor:
        dim = _merge_dim(key)
        if len(self.shards) == 1 or dim is None or self.shards[0][key].ndim <= dim:
            return self.shards[0][key]
        return torch.cat([s[key] for s in self.shards], dim=dim)


def read_meta_state(src_dir: str | Path) -> dict[str, torch.Tensor]:
    """All of a Meta checkpoint's tensors (shards merged as Meta's model parallelism split them; no rope.freqs)."""
    shards = _MetaShards(Path(src_dir))
    return {k: shards.tensor(k) for k in shards.shapes}


# ---------------------------------------------------------------------------------------------------- conversion


def _hf_llama_config(cfg: LLMConfig, dtype: torch.dtype) -> Any:
    hf = cfg.llama_config()
    hf.attention_bias = False  # base LLaMA has no biases; the adapter model's config turns them on
    hf.mlp_bias = False
    hf.dtype = dtype
    return hf


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    plan: list[list[str]] = [[]]
    filled = 0
    for key, nbytes in sizes:
        if plan[-1] and filled + nbytes > max_shard_bytes:
            plan.append([])
            filled = 0
        plan[-1].append(key)
        filled += nbytes
    return plan


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def convert_meta_llama(
    src_dir: str | Path,
    dst_dir: str | Path,
    *,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> str:
    """Write a transformers LLaMA directory (config.json, safetensors shards + index, tokenizer.model) for a Meta one.

    `dtype` None keeps the checkpoint's dtype. Everything is checked before anything is written; the output is
    assembled in a temporary sibling directory and renamed into place. Returns `dst_dir`.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if _is_nonempty(dst) and not overwrite:
        raise FileExistsError(f"{dst}: exists and is not empty; pass overwrite=True to replace it")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a directory")
    params = read_meta_params(src)
    shards = _MetaShards(src)
    origin = shards.origin

    try:
        meta_vocab = int(params.get("vocab_size", -1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{src / 'params.json'}: vocab_size {params.get('vocab_size')!r} is not an integer") from e
    if meta_vocab > 0 and vocab_size is not None and vocab_size != meta_vocab:
        raise ValueError(f"{src / 'params.json'}: vocab_size {meta_vocab} conflicts with vocab_size={vocab_size}")
    if meta_vocab <= 0 and vocab_size is None:  # LLaMA-1 says -1: the embedding's rows are the tokenizer's size
        if "tok_embeddings.weight" not in shards.shapes:
            raise ValueError(f"{origin}: missing tok_embeddings.weight (params.json vocab_size is -1)")
        vocab_size = shards.shapes["tok_embeddings.weight"][0]
    try:
        cfg = LLMConfig.from_meta_params(params, vocab_size=vocab_size)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{src / 'params.json'}: {e}") from e
    expected = meta_llama_shapes(cfg)
    _check_shapes(shards.shapes, expected, cfg, origin)
    dtypes = {k: shards.shards[0][k].dtype for k in expected}
    not_float = [f"{k} ({dt})" for k, dt in dtypes.items() if not dt.is_floating_point]
    if not_float:
        raise ValueError(f"{origin}: {len(not_float)} tensors are not floating point: {_listed(not_float)}")
    out_dtype = dict.fromkeys(expected, dtype) if dtype is not None else dtypes
    sizes = [(k, torch.Size(s).numel() * out_dtype[k].itemsize) for k, s in expected.items()]
    plan = _plan_shards(sizes, max_shard_bytes)
    tokenizer = next((p for p in (src / "tokenizer.model", src.parent / "tokenizer.model") if p.is_file()), None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        for n, keys in enumerate(plan, start=1):
            name = f"model-{n:05d}-of-{len(plan):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            storages: set[int] = set()
            for key in keys:
                t = _to_hf(key, shards.tensor(key), cfg).to(out_dtype[key]).contiguous()
                ptr = t.untyped_storage().data_ptr()
                if ptr in storages:  # safetensors refuses tensors sharing memory
                    t = t.clone()
                storages.add(t.untyped_storage().data_ptr())
                tensors[meta_to_hf_name(key)] = t
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, name)
            del tensors
        index = {"metadata": {"total_size": sum(b for _, b in sizes)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _hf_llama_config(cfg, dtype or dtypes["tok_embeddings.weight"]).save_pretrained(tmp)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(dst)
