"""ImageBind-LLM invariants: zero gates and zero LoRA, trainable sets at 7B shapes, checkpoints, loss, visual path."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from model.llm.bind import BindNetwork
from model.llm.cache import cache_mix, mix_modalities
from model.llm.checkpoint import from_pretrained, load_llama, load_tensors, read_checkpoint, save_checkpoint
from model.llm.config import LLMConfig
from model.llm.convert_adapter import (
    convert_official_adapter,
    export_official,
    official_shapes,
    official_to_ours,
    ours_to_official,
    to_official,
)
from model.llm.model import IGNORE, ImageBindLLM, answer_loss
from model.llm.phases import decay_groups, phase_parameters, set_phase
from model.weights import CheckpointMismatch
from tests.model.official_fixture import TINY, official_weights

RELEASED_KEYS = Path(__file__).parent / "data" / "adapter_7B_keys.tsv"  # the spec's listing of the released 7B.pth


def _randomise(model: ImageBindLLM, seed: int = 0) -> ImageBindLLM:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in phase_parameters(model).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _ids(b: int = 2, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, TINY.vocab_size, (b, n), generator=torch.Generator().manual_seed(seed))


def _feats(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, TINY.feature_dim, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- invariants


@torch.no_grad()
def test_zero_gates_give_exactly_the_base_logits() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(TINY.llama_config()).eval()
    reference = copy.deepcopy(base)
    for layer in reference.model.layers:  # ImageBindLLM zeroes the k/v biases it holds fixed
        layer.self_attn.k_proj.bias.zero_(), layer.self_attn.v_proj.bias.zero_()
    model = ImageBindLLM(TINY, base).eval()
    with torch.no_grad():
        model.bind.proj.bias.normal_(), model.prefix_query.weight.normal_()
    ids = _ids()
    assert torch.equal(model(ids, _feats()).logits, reference(input_ids=ids).logits)


@torch.no_grad()
def test_zero_lora_b_gives_the_pre_lora_logits_and_gates_reach_the_output() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(TINY.llama_config()).eval()
    plain = ImageBindLLM(TINY, copy.deepcopy(base), lora=False).eval()
    lora = ImageBindLLM(TINY, base, lora=True).eval()
    lora.load_state_dict(plain.state_dict(), strict=False)  # bind, prefix, gates; the LLaMAs are equal copies
    for m in (plain, lora):
        for g in m.gates:
            g.fill_(0.7)
    ids, feats = _ids(), _feats()
    assert torch.equal(lora(ids, feats).logits, plain(ids, feats).logits)
    assert (plain(ids, feats).logits - plain(ids).logits).abs().max() > 1e-3


def test_gradients_reach_gates_from_zero_and_stage1_leaves_llama_alone() -> None:
    torch.manual_seed(0)
    model = ImageBindLLM(TINY)
    trainable = set_phase(model, "pretrain")
    assert set(trainable) == {n for n in phase_parameters(model, "pretrain")}
    labels = _ids().clone()
    labels[:, :4] = IGNORE
    model(_ids(), _feats(), labels=labels).loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in model.gates)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("llama."))


def test_trainable_sets_at_7b_shapes_equal_the_released_checkpoint() -> None:
    """Built on the meta device; our names mapped to official ones must give adapter_7B_keys.tsv, phase by phase."""
    rows = [line.split("\t") for line in RELEASED_KEYS.read_text().splitlines()[1:] if line.strip()]
    released = {k: tuple(int(x) for x in re.findall(r"\d+", s)) for k, s in rows}
    assert len(released) == 720
    config = LLMConfig.preset("7B")
    shapes = official_shapes(config)
    assert shapes == released
    with torch.device("meta"):
        model = ImageBindLLM(config)

    def official(phase: str) -> set[str]:
        return {to_official(n, p, config)[0] for n, p in phase_parameters(model, phase).items()}

    stage2 = {k for k in released if k.startswith("llama.") and re.search("norm|bias|lora", k)}
    stage1 = {k for k in released if k.startswith(("image_bind_", "prefix_query")) or k.endswith(".gate")}
    assert official("finetune") == stage2 and official("pretrain") == stage1
    assert sum(p.numel() for p in phase_parameters(model).values()) == 649_663_488


def test_weight_decay_groups_follow_the_reference() -> None:
    model = ImageBindLLM(TINY)
    params = phase_parameters(model)
    decay, no_decay = (set(map(id, g["params"])) for g in decay_groups(params, 0.05))
    assert id(params["gates.0"]) in decay  # (1, H, 1, 1) upstream: decayed
    assert id(params["bind.proj.weight"]) in decay and id(params["bind.proj.bias"]) in no_decay
    assert id(params["llama.model.norm.weight"]) in no_decay
    assert id(params["llama.model.layers.0.self_attn.q_proj.lora_A.weight"]) in decay


# ----------------------------------------------------------------------------- loss and visual path


def test_loss_is_the_token_mean_over_answer_tokens() -> None:
    logits = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 3:5] = torch.tensor([4, 5])
    labels[1, 2] = 7
    picked = [(0, 2, 4), (0, 3, 5), (1, 1, 7)]  # (row, position predicting, target)
    expected = torch.stack([-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in picked]).mean()
    assert torch.allclose(answer_loss(logits, labels), expected)
    empty = answer_loss(logits.requires_grad_(), torch.full((2, 6), IGNORE))
    assert empty.item() == 0.0 and empty.requires_grad


@torch.no_grad()
def test_visual_query_mixes_modalities_and_the_cache() -> None:
    model = _randomise(ImageBindLLM(TINY, lora=False))
    a, b = _feats(3, 1), _feats(3, 2)
    mixed = mix_modalities({"vision": a, "audio": b}, {"vision": 1.0, "audio": 3.0})
    assert torch.allclose(model.visual_query({"vision": a, "audio": b}, {"audio": 3.0}), model.bind(mixed[:, None]))
    values = torch.nn.functional.normalize(torch.randn(3, 5, TINY.feature_dim), dim=-1)
    sims = torch.einsum("bd,bkd->bk", mixed, values)
    got = model.visual_query({"vision": a, "audio": b}, {"audio": 3.0}, cache=lambda q: (sims, values))
    assert torch.allclose(got, model.bind(cache_mix(mixed, sims, values)[:, None]))
    assert isinstance(model.bind, BindNetwork) and got.shape == (3, 1, TINY.dim)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def base_dir(tmp_path: Path) -> str:
    torch.manual_seed(3)
    hf = TINY.llama_config()
    hf.attention_bias = hf.mlp_bias = False  # a plain LLaMA, as users have it
    LlamaForCausalLM(hf).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


@torch.no_grad()
def test_save_load_round_trip_is_exact(tmp_path: Path, base_dir: str) -> None:
    model = _randomise(ImageBindLLM(TINY, load_llama(base_dir))).eval()
    path = save_checkpoint(model, str(tmp_path / "ckpt"), {"stage": 2})
    loaded = from_pretrained(path, base_dir).eval()
    ids, feats = _ids(), _feats()
    assert torch.equal(model(ids, feats).logits, loaded(ids, feats).logits)
    config, tensors, doc = read_checkpoint(path)
    assert config == TINY and doc["metadata"] == {"stage": 2}
    assert sorted((tmp_path / "ckpt" / "lora").iterdir())[0].name == "adapter_config.json"
    save_checkpoint(model, path)  # overwrite in place, atomically
    assert read_checkpoint(path)[1].keys() == tensors.keys()


def test_official_round_trip_is_an_identity(tmp_path: Path) -> None:
    _, adapter = official_weights(TINY, seed=4)
    torch.save({"model": adapter}, tmp_path / "7B.pth")
    ours = convert_official_adapter(str(tmp_path / "7B.pth"), str(tmp_path / "ours"), vocab_size=TINY.vocab_size)
    back = export_official(ours, str(tmp_path / "back.pth"))
    again = torch.load(back, weights_only=True)["model"]
    assert again.keys() == adapter.keys()
    assert all(torch.equal(again[k], adapter[k]) for k in adapter)
    assert ours_to_official(official_to_ours(adapter, TINY), TINY).keys() == adapter.keys()


def test_a_full_training_checkpoint_is_stripped_like_the_reference(tmp_path: Path) -> None:
    llama, adapter = official_weights(TINY, seed=4)
    full = adapter | {f"llama.{k}": v for k, v in llama.items()} | {"image_bind.trunk.w": torch.zeros(2)}
    torch.save({"model": full, "epoch": 3}, tmp_path / "full.pth")
    ours = convert_official_adapter(str(tmp_path / "full.pth"), str(tmp_path / "ours"), vocab_size=TINY.vocab_size)
    assert read_checkpoint(ours)[1].keys() == official_to_ours(adapter, TINY).keys()


# ----------------------------------------------------------------------------- bad input


def test_missing_or_extra_keys_are_refused_and_nothing_is_loaded(tmp_path: Path) -> None:
    model = _randomise(ImageBindLLM(TINY))
    path = save_checkpoint(model, str(tmp_path / "ckpt"))
    target = ImageBindLLM(TINY)
    before = {k: v.clone() for k, v in phase_parameters(target).items()}
    _, tensors, _ = read_checkpoint(path)
    missing = {k: v for k, v in tensors.items() if k != "gates.1"}
    with pytest.raises(CheckpointMismatch, match=r"1 missing: gates\.1"):
        load_tensors(target, missing, "ckpt")
    with pytest.raises(CheckpointMismatch, match=r"1 unexpected: bind\.extra"):
        load_tensors(target, tensors | {"bind.extra": torch.zeros(1)}, "ckpt")
    assert all(torch.equal(before[k], v) for k, v in phase_parameters(target).items())
    adapter = load_file(tmp_path / "ckpt" / "adapter.safetensors")
    del adapter["prefix_query.weight"]
    save_file(adapter, tmp_path / "ckpt" / "adapter.safetensors")
    with pytest.raises(CheckpointMismatch, match=r"ckpt does not fit .* missing: prefix_query\.weight"):
        from_pretrained(path)


def test_the_wrong_hidden_size_is_refused(tmp_path: Path, base_dir: str) -> None:
    wide = LLMConfig(**{**TINY.to_dict(), "dim": 48, "n_heads": 4})
    path = save_checkpoint(ImageBindLLM(wide), str(tmp_path / "wide"))
    with pytest.raises(CheckpointMismatch, match=r"dim=48, the base LLaMA .* has dim=32"):
        from_pretrained(path, base_dir)
    _, adapter = official_weights(TINY)
    adapter["prefix_query.weight"] = torch.zeros(2, 48)
    with pytest.raises(CheckpointMismatch, match=r"prefix_query\.weight \(2, 48\) vs \(2, 32\)"):
        official_to_ours(adapter, TINY)


class Payload:
    """Not a tensor: a weights-only load must refuse to build it."""


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path: Path) -> None:
    _, adapter = official_weights(TINY)
    torch.save({"model": adapter, "evil": Payload()}, tmp_path / "7B.pth")
    with pytest.raises(CheckpointMismatch, match=r"7B\.pth: not a weights-only checkpoint"):
        convert_official_adapter(str(tmp_path / "7B.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
