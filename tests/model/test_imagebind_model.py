"""ImageBind: the official layout, attention semantics, output scaling, the clip rules, loading, dtypes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.imagebind.config import ImageBindConfig
from model.imagebind.layers import Attention
from model.imagebind.model import ImageBindModel
from model.weights import CheckpointMismatch, load_weights, read_state_dict

KEYS = Path(__file__).parent / "data" / "imagebind_huge_keys.tsv"


@pytest.fixture(scope="module")
def tiny() -> ImageBindModel:
    torch.manual_seed(0)
    return ImageBindModel(ImageBindConfig.from_preset("tiny")).eval()


def inputs(b: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(b, 77, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:5] = torch.randint(1, 40000, (b, 4), generator=g)
    tokens[:, 5] = 49407
    return {
        "vision": torch.randn(b, 3, 224, 224, generator=g),
        "text": tokens,
        "audio": torch.randn(b, 3, 1, 128, 204, generator=g),
        "depth": torch.randn(b, 1, 224, 224, generator=g),
        "thermal": torch.randn(b, 1, 224, 224, generator=g),
        "imu": torch.randn(b, 6, 2000, generator=g),
    }


def test_huge_has_exactly_the_official_keys_shapes_and_kinds() -> None:
    with torch.device("meta"):
        model = ImageBindModel(ImageBindConfig.from_preset("huge"))
    ref = {r["key"]: r for r in csv.DictReader(KEYS.open(), delimiter="\t")}
    state = model.state_dict()
    assert set(state) == set(ref) and len(ref) == 1311
    for key, row in ref.items():
        assert str(tuple(state[key].shape)) == row["shape"].replace(",)", ",)"), key
    params = dict(model.named_parameters())
    assert {k for k, r in ref.items() if r["kind"] == "param"} == set(params)
    assert sum(p.numel() for p in model.parameters()) == 1_200_781_057


@pytest.mark.parametrize(("bias_kv", "causal"), [(False, False), (True, False), (False, True), (True, True)])
def test_attention_equals_torch_multihead_attention(bias_kv: bool, causal: bool) -> None:
    torch.manual_seed(0)
    dim, heads, n = 48, 4, 9
    ours = Attention(dim, heads, add_bias_kv=bias_kv)
    ref = torch.nn.MultiheadAttention(dim, heads, add_bias_kv=bias_kv)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, n, dim)
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
    expected = ref(*(x.transpose(0, 1),) * 3, need_weights=False, attn_mask=mask)[0].transpose(0, 1)
    torch.testing.assert_close(ours(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_outputs_are_normalised_and_scaled(tiny: ImageBindModel) -> None:
    out = tiny(inputs())
    scales = {"vision": 1.0, "text": 1 / 0.07, "audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
    for m, scale in scales.items():
        assert out[m].shape == (2, 1024)
        if m != "audio":  # audio arrives as 3 clips: a mean of scaled unit vectors
            torch.testing.assert_close(out[m].norm(dim=-1), torch.full((2,), scale), rtol=1e-5, atol=1e-5)
    post = tiny.modality_postprocessors["text"][1]
    with torch.no_grad():
        post.log_logit_scale.fill_(math.log(1000.0))
    try:
        torch.testing.assert_close(tiny.embed("text", inputs()["text"]).norm(dim=-1), torch.full((2,), 100.0))
    finally:
        with torch.no_grad():
            post.log_logit_scale.fill_(math.log(1 / 0.07))


def test_clip_rules(tiny: ImageBindModel) -> None:
    x = inputs()["vision"]
    image = tiny.embed("vision", x)
    torch.testing.assert_close(tiny.embed("vision", x[:, None]), image)  # (B, 1, 3, H, W)
    torch.testing.assert_close(tiny.embed("vision", x[:, None, :, None]), image)  # (B, 1, 3, 1, H, W)
    torch.testing.assert_close(tiny.embed("vision", x[:, None, :, None].expand(-1, -1, -1, 2, -1, -1)), image)
    video = torch.randn(2, 3, 3, 2, 224, 224)  # (B, S clips, C, T, H, W)
    per_clip = torch.stack([tiny.embed("vision", video[:, s : s + 1]) for s in range(3)], dim=1)  # keep it 6-D
    torch.testing.assert_close(tiny.embed("vision", video), per_clip.mean(dim=1), atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="channels"):  # a 5-D clip is read as C clips of 2-channel images
        tiny.embed("vision", video[:, 0])
    audio = inputs()["audio"]
    clips = torch.stack([tiny.embed("audio", audio[:, s]) for s in range(3)], dim=1)
    torch.testing.assert_close(tiny.embed("audio", audio), clips.mean(dim=1), atol=1e-5, rtol=1e-5)


def test_text_pools_at_the_first_end_of_text(tiny: ImageBindModel) -> None:
    tokens = inputs()["text"]
    changed = tokens.clone()
    changed[:, 6:] = 123  # after the EOT: invisible to it through the causal mask
    torch.testing.assert_close(tiny.embed("text", changed), tiny.embed("text", tokens))
    earlier = tokens.clone()
    earlier[:, 3] = 49407  # a literal <|endoftext|> earlier in the text: pooled there (first max)
    truncated = tokens.clone()
    truncated[:, 4:] = 0
    truncated[:, 3] = 49407
    torch.testing.assert_close(tiny.embed("text", earlier), tiny.embed("text", truncated))


def test_deterministic_and_batch_independent(tiny: ImageBindModel) -> None:
    a, b = tiny(inputs(seed=3)), tiny(inputs(seed=3))
    for m in a:
        assert torch.equal(a[m], b[m])
    single = tiny.embed("vision", inputs(seed=3)["vision"][:1])
    torch.testing.assert_close(single, a["vision"][:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip_and_mismatch_messages(tiny: ImageBindModel, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    fresh = ImageBindModel(ImageBindConfig.from_preset("tiny")).eval()
    load_weights(fresh, read_state_dict(str(path)), str(path))
    x = inputs()
    for m, v in fresh(x).items():
        assert torch.equal(v, tiny(x)[m])
    bad = dict(state)
    for k in [k for k in bad if k.startswith("modality_trunks.imu")]:
        del bad[k]
    bad["extra.weight"] = torch.zeros(1)
    bad["modality_heads.vision.2.weight"] = torch.zeros(7, 7)
    with pytest.raises(CheckpointMismatch) as e:
        load_weights(fresh, bad, "bad.pth")
    msg = str(e.value)
    assert "missing: modality_trunks.imu.blocks.0.attn.bias_k" in msg and "(+" in msg
    assert "1 unexpected: extra.weight" in msg and "modality_heads.vision.2.weight (7, 7) vs (1024, 64)" in msg


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": Path("x")}, path)
    with pytest.raises(CheckpointMismatch, match="not a weights-only checkpoint"):
        read_state_dict(str(path))


def test_bf16_autocast_matches_fp32(tiny: ImageBindModel) -> None:
    x = inputs(seed=5)
    ref = tiny(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiny(x)
    for m in ref:
        cos = torch.nn.functional.cosine_similarity(low[m].float(), ref[m], dim=-1)
        assert cos.min() >= 0.999, (m, cos)
