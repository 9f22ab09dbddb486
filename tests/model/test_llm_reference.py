"""Our converted ImageBind-LLM against a Meta-layout reference forward written from the spec, and the two traps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.llm.checkpoint import from_pretrained
from model.llm.convert_adapter import convert_official_adapter
from model.llm.convert_llama import convert_meta_llama, unpermute_qk
from model.llm.model import ImageBindLLM
from tests.model.meta_reference import meta_forward, meta_visual
from tests.model.official_fixture import TINY, official_weights, reference_state, write_meta_llama


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path, Path]:
    """Official-layout weights on disk, converted the way a user would: LLaMA folder and adapter .pth."""
    root = tmp_path_factory.mktemp("released")
    llama, adapter = official_weights(TINY, seed=1)
    write_meta_llama(str(root / "meta" / "tiny"), llama)
    torch.save({"model": adapter}, root / "adapter.pth")
    hf_dir = convert_meta_llama(str(root / "meta" / "tiny"), str(root / "hf"))
    ours = convert_official_adapter(str(root / "adapter.pth"), str(root / "ours"), vocab_size=TINY.vocab_size)
    return llama, adapter, Path(hf_dir), Path(ours)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, TINY.vocab_size, (3, 11), generator=g), torch.randn(3, TINY.feature_dim, generator=g)


def _ours(released: tuple) -> ImageBindLLM:
    _, _, hf_dir, ours = released
    return from_pretrained(str(ours), str(hf_dir)).eval()


def _reference(released: tuple, ids: torch.Tensor, feats: torch.Tensor, **kw) -> torch.Tensor:
    llama, adapter, _, _ = released
    vq = meta_visual(adapter, feats)
    return meta_forward(
        reference_state(llama, adapter),
        ids,
        n_heads=TINY.n_heads,
        visual_query=vq,
        prefix=adapter["prefix_query.weight"],
        query_layer=TINY.query_layer,
        **kw,
    )


@torch.no_grad()
def test_converted_model_matches_the_meta_layout_reference(released: tuple, inputs: tuple) -> None:
    ids, feats = inputs
    ref = _reference(released, ids, feats)
    ours = _ours(released)(ids, feats).logits
    assert ref.abs().max() > 1.0  # a real logit scale, not a degenerate model
    assert (ours - ref).abs().max() < 1e-5


@torch.no_grad()
def test_trap_adapter_value_through_lora_changes_the_logits(released: tuple, inputs: tuple) -> None:
    ids, feats = inputs
    trap = _reference(released, ids, feats, adapter_lora=True)
    ours = _ours(released)(ids, feats).logits
    assert (ours - trap).abs().max() > 1e-2


@torch.no_grad()
def test_trap_unpermuted_q_bias_changes_the_logits(released: tuple, inputs: tuple) -> None:
    ids, feats = inputs
    model = _ours(released)
    good = model(ids, feats).logits
    for layer in model.layers:
        bias = layer.self_attn.q_proj.base_layer.bias
        bias.copy_(unpermute_qk(bias, TINY.n_heads))  # the Meta row order left in place
    assert (model(ids, feats).logits - good).abs().max() > 1e-2


@torch.no_grad()
def test_reference_without_visual_matches_the_base_model(released: tuple, inputs: tuple) -> None:
    """Text only (no injection): the converted LLaMA with the adapter's norms, biases and LoRA."""
    llama, adapter, _, _ = released
    ids, _ = inputs
    ref = meta_forward(reference_state(llama, adapter), ids, n_heads=TINY.n_heads)
    assert (_ours(released)(ids).logits - ref).abs().max() < 1e-5
