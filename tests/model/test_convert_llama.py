"""Meta LLaMA -> transformers conversion: logits against the Meta-layout reference, sharding, strictness."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from model.llm.config import LLMConfig
from model.llm.convert_llama import (
    convert_meta_llama,
    hf_to_meta_state,
    meta_to_hf_state,
    permute_qk,
    read_meta_params,
    read_meta_state,
    unpermute_qk,
)
from tests.model.meta_reference import meta_forward

DIM, LAYERS, HEADS, FFN, VOCAB = 64, 2, 4, 192, 100  # FFN = 32 * ceil(int(2 * 4 * 64 / 3) / 32)
PARAMS = {"dim": DIM, "multiple_of": 32, "n_heads": HEADS, "n_layers": LAYERS, "norm_eps": 1e-6, "vocab_size": -1}
COLUMN, ROW = ("wq", "wk", "wv", "w1", "w3", "output"), ("wo", "w2", "tok_embeddings")


class NotATensor:
    """A pickled custom object: what `weights_only=True` must refuse."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def meta_state(seed: int = 0, kv_heads: int = HEADS) -> dict[str, torch.Tensor]:
    """Random base LLaMA weights in Meta layout, activations of order 1, norms not all ones."""
    g = torch.Generator().manual_seed(seed)

    def w(rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * scale / math.sqrt(cols)

    def norm() -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(DIM, generator=g)

    kv = kv_heads * DIM // HEADS
    sd = {"tok_embeddings.weight": torch.randn(VOCAB, DIM, generator=g)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd |= {
            p + "attention.wq.weight": w(DIM, DIM, 2.0),
            p + "attention.wk.weight": w(kv, DIM, 2.0),
            p + "attention.wv.weight": w(kv, DIM),
            p + "attention.wo.weight": w(DIM, DIM),
            p + "feed_forward.w1.weight": w(FFN, DIM),
            p + "feed_forward.w2.weight": w(DIM, FFN),
            p + "feed_forward.w3.weight": w(FFN, DIM),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        }
    sd |= {"norm.weight": norm(), "output.weight": w(VOCAB, DIM, 1.5)}
    return sd


def split_like_meta(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's model parallelism: column-parallel on dim 0, row-parallel and embeddings on dim 1, norms replicated."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in state.items():
        module = key.split(".")[-2] if "." in key else key
        dim = 0 if module in COLUMN else 1 if module in ROW else None
        parts = [t] * n if dim is None else list(t.chunk(n, dim=dim))
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def write_meta(folder: Path, state: dict[str, object], n_shards: int = 1, params: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params or PARAMS))
    shards = split_like_meta(state, n_shards) if n_shards > 1 else [state]  # type: ignore[arg-type]
    for rank, shard in enumerate(shards):
        torch.save(shard | {"rope.freqs": torch.ones(DIM // HEADS // 2)}, folder / f"consolidated.{rank:02d}.pth")
    return folder


def load_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        out |= load_file(path / name)
    assert sorted(out) == sorted(index["weight_map"])
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    root = tmp_path_factory.mktemp("convert")
    state = meta_state()
    src = write_meta(root / "llama" / "7B", state)
    (root / "llama" / "tokenizer.model").write_bytes(b"sentencepiece stand-in")
    dst = Path(convert_meta_llama(src, root / "hf", max_shard_bytes=60_000))
    return state, src, dst


def test_converted_logits_match_meta_reference(converted: tuple[dict[str, torch.Tensor], Path, Path]) -> None:
    state, _, dst = converted
    config = json.loads((dst / "config.json").read_text())
    assert (config["vocab_size"], config["intermediate_size"], config["rms_norm_eps"]) == (VOCAB, FFN, 1e-6)
    assert (config["attention_bias"], config["mlp_bias"], config["dtype"]) == (False, False, "float32")
    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    assert (dst / "tokenizer.model").read_bytes() == b"sentencepiece stand-in"

    model = LlamaForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tokens = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens).logits
    want = meta_forward(state, tokens, n_heads=HEADS)
    assert want.abs().max() > 3  # a meaningful logit scale (~5)
    assert (got - want).abs().max() < 1e-5

    # without the q/k permutation the rotary pairs are wrong: the same check must fail clearly
    raw = load_hf_dir(dst)
    for i in range(LAYERS):
        raw[f"model.layers.{i}.self_attn.q_proj.weight"] = state[f"layers.{i}.attention.wq.weight"]
        raw[f"model.layers.{i}.self_attn.k_proj.weight"] = state[f"layers.{i}.attention.wk.weight"]
    model.load_state_dict(raw, strict=True)
    with torch.no_grad():
        assert (model(tokens).logits - want).abs().max() > 0.1


def test_permute_matches_spec_formula_and_inverts() -> None:
    n_heads, hd = 3, 8
    got = permute_qk(torch.arange(n_heads * hd), n_heads)
    for h in range(n_heads):
        for a in (0, 1):
            for j in range(hd // 2):
                assert got[h * hd + a * hd // 2 + j] == h * hd + 2 * j + a
    for shape in [(24,), (24, 7), (24, 16)]:  # bias, weight, LoRA B
        x = torch.randn(shape)
        assert torch.equal(unpermute_qk(permute_qk(x, n_heads), n_heads), x)
        assert torch.equal(permute_qk(unpermute_qk(x, n_heads), n_heads), x)
    assert torch.equal(permute_qk(torch.arange(24).view(24, 1), 3).view(-1), got)
    with pytest.raises(ValueError, match="heads"):
        permute_qk(torch.zeros(10, 2), 4)


@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_round_trip_meta_hf_meta_is_identity(kv_heads: int) -> None:
    state = meta_state(seed=2, kv_heads=kv_heads)
    cfg = LLMConfig.from_meta_params(PARAMS | {"n_kv_heads": kv_heads}, vocab_size=VOCAB)
    hf = meta_to_hf_state(state, cfg)
    assert all(k.startswith(("model.", "lm_head.")) for k in hf)
    assert not torch.equal(hf["model.layers.0.self_attn.k_proj.weight"], state["layers.0.attention.wk.weight"])
    back = hf_to_meta_state(hf, cfg)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_two_shards_convert_like_one(tmp_path: Path) -> None:
    state = meta_state(seed=3)
    one = convert_meta_llama(write_meta(tmp_path / "one", state), tmp_path / "hf1")
    two_src = write_meta(tmp_path / "two", state, n_shards=2)
    assert sorted(p.name for p in two_src.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert read_meta_params(two_src) == PARAMS
    merged = read_meta_state(two_src)
    assert list(merged) == list(state) and all(torch.equal(merged[k], state[k]) for k in state)
    two = convert_meta_llama(two_src, tmp_path / "hf2", dtype=torch.bfloat16)
    a, b = load_hf_dir(Path(one)), load_hf_dir(Path(two))
    assert sorted(a) == sorted(b) == sorted(LlamaForCausalLM.from_pretrained(one).state_dict())
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)
    assert json.loads((Path(two) / "config.json").read_text())["dtype"] == "bfloat16"


def _drop(sd: dict) -> None:
    del sd["layers.1.ffn_norm.weight"]


def _extra(sd: dict) -> None:
    sd["layers.0.attention.wz.weight"] = torch.zeros(DIM, DIM)


def _reshape(sd: dict) -> None:
    sd["layers.0.attention.wq.weight"] = torch.zeros(DIM, DIM // 2)


def _pickle(sd: dict) -> None:
    sd["layers.0.attention.wq.weight"] = NotATensor()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop, r"consolidated.00.pth.*1 missing keys: layers.1.ffn_norm.weight"),
        (_extra, r"consolidated.00.pth.*1 unexpected keys: layers.0.attention.wz.weight"),
        (_reshape, r"consolidated.00.pth.*1 wrong shapes: layers.0.attention.wq.weight \(64, 32\) \(want \(64, 64\)\)"),
        (_pickle, r"consolidated.00.pth: not a plain tensor checkpoint"),
        ("nested", r"consolidated.00.pth: 1 values are not tensors: model \(dict\)"),
        ("no params", r"params.json: missing"),
        ("no shards", r"no consolidated.\*.pth"),
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path: Path, mutate: object, message: str) -> None:
    state: dict = meta_state()
    if callable(mutate):
        mutate(state)
    src = write_meta(tmp_path / "src", {"model": state} if mutate == "nested" else state)
    if mutate == "no params":
        (src / "params.json").unlink()
    if mutate == "no shards":
        (src / "consolidated.00.pth").unlink()
    with pytest.raises(ValueError, match=message):
        convert_meta_llama(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    src = write_meta(tmp_path / "src", meta_state())
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="dst"):
        convert_meta_llama(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "old.txt").exists()
    convert_meta_llama(src, tmp_path / "dst", overwrite=True)
    assert not (tmp_path / "dst" / "old.txt").exists() and (tmp_path / "dst" / "config.json").exists()
    assert not (tmp_path / "dst" / "tokenizer.model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_strict_state_errors_count_and_name_keys() -> None:
    cfg = LLMConfig.from_meta_params(PARAMS, vocab_size=VOCAB)
    state = meta_state()
    del state["norm.weight"], state["output.weight"]
    with pytest.raises(ValueError, match=re.escape("2 missing keys: norm.weight, output.weight")):
        meta_to_hf_state(state, cfg)


def _adapter_state(seed: int = 4) -> dict[str, torch.Tensor]:
    """Base weights plus ImageBind-LLM's biases (wq, wo, w1-3), LoRA on all 7 linears and per-head gates."""
    g = torch.Generator().manual_seed(seed)
    sd = meta_state(seed)
    rank = 4
    for i in range(LAYERS):
        att, ffn = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        for name, rows in [
            (att + "wq", DIM),
            (att + "wo", DIM),
            (ffn + "w1", FFN),
            (ffn + "w2", DIM),
            (ffn + "w3", FFN),
        ]:
            sd[name + ".bias"] = 0.1 * torch.randn(rows, generator=g)
        for name in [att + "wq", att + "wk", att + "wv", att + "wo", ffn + "w1", ffn + "w2", ffn + "w3"]:
            module, leaf = name.rsplit(".", 1)
            out_f, in_f = sd[name + ".weight"].shape
            sd[f"{module}.lora_{leaf}_l1.weight"] = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
            sd[f"{module}.lora_{leaf}_l2.weight"] = 0.1 * torch.randn(out_f, rank, generator=g) / math.sqrt(rank)
        sd[att + "gate"] = torch.randn(1, HEADS, 1, 1, generator=g)
    return sd


def test_meta_reference_adapter_sanity() -> None:
    sd = _adapter_state()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    vq, prefix = torch.randn(2, 1, DIM, generator=g), torch.randn(LAYERS, DIM, generator=g)
    plain = meta_forward(sd, tokens, n_heads=HEADS)
    full = meta_forward(sd, tokens, n_heads=HEADS, visual_query=vq, prefix=prefix)
    last = meta_forward(sd, tokens, n_heads=HEADS, visual_query=vq, prefix=prefix[-1:], query_layer=1)
    assert full.shape == (2, 9, VOCAB) and full.dtype == torch.float32 and full.isfinite().all()
    assert (full - plain).abs().max() > 0.1 and (last - full).abs().max() > 0.01 and (last - plain).abs().max() > 0.01
    assert (plain - meta_forward(meta_state(4), tokens, n_heads=HEADS)).abs().max() > 0.01  # biases/LoRA matter
    closed = sd | {f"layers.{i}.attention.gate": torch.zeros(1, HEADS, 1, 1) for i in range(LAYERS)}
    gated_off = meta_forward(closed, tokens, n_heads=HEADS, visual_query=vq, prefix=prefix)
    torch.testing.assert_close(gated_off, plain, rtol=0, atol=0)
