"""Point-Bind's 3D branch: the released key set, the spec restated functionally, grouping rules, loading, errors."""

from __future__ import annotations

import copy
import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.imagebind.config import ImageBindConfig
from model.imagebind.encoder import ImageBind
from model.imagebind.model import ImageBindModel
from model.imagebind.point import farthest_points, group, nearest_neighbours, seeded_starts
from model.weights import CheckpointMismatch

POINT_KEYS = Path(__file__).parent / "data" / "point_bind_keys.tsv"  # the spec's listing of imagebind_w3D.pth
HUGE_KEYS = Path(__file__).parent / "data" / "imagebind_huge_keys.tsv"
POINT_PREFIXES = ("point_trunk.", "modality_heads.point.", "modality_postprocessors.point.")


@pytest.fixture(scope="module")
def tiny() -> ImageBindModel:
    torch.manual_seed(0)
    model = ImageBindModel(ImageBindConfig.from_preset("tiny").with_point()).eval()
    with torch.no_grad():  # give every BatchNorm statistics and affine values that matter
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    return model


def cloud(n: int = 200, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))


def test_huge_with_point_has_exactly_the_released_w3d_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = ImageBindModel(ImageBindConfig.from_preset("huge").with_point())
    rows = [*csv.DictReader(POINT_KEYS.open(), delimiter="\t"), *csv.DictReader(HUGE_KEYS.open(), delimiter="\t")]
    ref = {r["key"]: r for r in rows}
    state = model.state_dict()
    assert set(state) == set(ref) and len(ref) == 1311 + 165
    for key, row in ref.items():
        assert str(tuple(state[key].shape)) == row["shape"], key
    params = dict(model.named_parameters())
    assert {k for k, r in ref.items() if r["kind"] == "param"} == set(params)
    assert sum(p.numel() for k, p in params.items() if k.startswith(POINT_PREFIXES)) == 22_777_344


Tensors = dict[str, torch.Tensor]


def reference_embed(state: Tensors, cfg: ImageBindConfig, xyz: torch.Tensor, start: int) -> torch.Tensor:
    """The spec (shared/spec/point-bind.md) restated in functional torch with plain loops, for one cloud (N, 3)."""
    p = "point_trunk.point_encoder."
    # farthest point sampling: squared distances summed over x, y, z; first index among ties
    chosen, nearest, current = [], torch.full((xyz.shape[0],), 1e10), start
    for _ in range(cfg.point_groups):
        chosen.append(current)
        nearest = torch.minimum(nearest, ((xyz - xyz[current]) ** 2).sum(-1))
        current = int(torch.argmax(nearest))
    centres = xyz[chosen]
    d = -2 * centres @ xyz.T + (centres**2).sum(-1)[:, None] + (xyz**2).sum(-1)[None]
    groups = xyz[d.topk(cfg.point_group_size, largest=False).indices] - centres[:, None]  # (G, K, 3)

    def conv_block(x: torch.Tensor, name: str) -> torch.Tensor:  # x (G, C, K)
        w = lambda i, s: state[f"{p}encoder.{name}.{i}.{s}"]  # noqa: E731
        x = F.conv1d(x, w(0, "weight"), w(0, "bias"))
        x = F.batch_norm(x, w(1, "running_mean"), w(1, "running_var"), w(1, "weight"), w(1, "bias"), eps=1e-5)
        return F.conv1d(F.relu(x), w(3, "weight"), w(3, "bias"))

    x = conv_block(groups.transpose(1, 2), "first_conv")
    x = torch.cat([x.max(dim=2, keepdim=True).values.expand_as(x), x], dim=1)
    feats = conv_block(x, "second_conv").max(dim=2).values  # (G, E)
    tokens = F.linear(feats, state[f"{p}reduce_dim.weight"], state[f"{p}reduce_dim.bias"])
    pos = F.gelu(F.linear(centres, state[f"{p}pos_embed.0.weight"], state[f"{p}pos_embed.0.bias"]))
    pos = F.linear(pos, state[f"{p}pos_embed.2.weight"], state[f"{p}pos_embed.2.bias"])
    x = torch.cat([state[f"{p}cls_token"][0], tokens])
    pos = torch.cat([state[f"{p}cls_pos"][0], pos])
    dim, heads = cfg.point_embed_dim, cfg.point_num_heads
    for i in range(cfg.point_num_blocks):
        b = lambda s, i=i: state[f"{p}blocks.blocks.{i}.{s}"]  # noqa: E731
        x = x + pos
        h = F.layer_norm(x, (dim,), b("norm1.weight"), b("norm1.bias"), eps=1e-5)
        q, k, v = (h @ b("attn.qkv.weight").T).split(dim, dim=-1)
        outs = []
        for j in range(heads):
            sl = slice(j * dim // heads, (j + 1) * dim // heads)
            att = torch.softmax(q[:, sl] @ k[:, sl].T * (dim // heads) ** -0.5, dim=-1)
            outs.append(att @ v[:, sl])
        x = x + F.linear(torch.cat(outs, -1), b("attn.proj.weight"), b("attn.proj.bias"))
        h = F.layer_norm(x, (dim,), b("norm2.weight"), b("norm2.bias"), eps=1e-5)
        h = F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias")))
        x = x + F.linear(h, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
    x = F.layer_norm(x, (dim,), state[f"{p}norm.weight"], state[f"{p}norm.bias"], eps=1e-5)
    pooled = torch.cat([x[0], x[1:].max(dim=0).values]) @ state["point_trunk.pc_projection"]
    h = F.layer_norm(
        pooled,
        (cfg.point_proj_dim,),
        state["modality_heads.point.0.weight"],
        state["modality_heads.point.0.bias"],
        eps=1e-6,
    )
    return F.normalize(h @ state["modality_heads.point.2.weight"].T, dim=-1)


def test_forward_equals_the_spec_restated(tiny: ImageBindModel) -> None:
    xyz = cloud(n=150, b=2, seed=3)
    state = tiny.state_dict()
    out = tiny.embed("point", xyz, torch.tensor([5, 77]))
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))  # logit scale exp(0) = 1
    for i, start in enumerate((5, 77)):
        torch.testing.assert_close(out[i], reference_embed(state, tiny.cfg, xyz[i], start), atol=2e-6, rtol=1e-5)


def test_start_index_batches_and_seeds(tiny: ImageBindModel) -> None:
    xyz = cloud(n=120, b=3, seed=4)
    start = torch.tensor([0, 10, 20])
    batch = tiny.embed("point", xyz, start)
    for i in range(3):  # a cloud gives the same result alone or in a batch
        torch.testing.assert_close(tiny.embed("point", xyz[i : i + 1], start[i : i + 1]), batch[i : i + 1])
    assert not torch.allclose(tiny.embed("point", xyz, torch.tensor([1, 11, 21])), batch)
    assert torch.equal(seeded_starts([120, 120, 50], 7), seeded_starts([120, 120, 50], 7))
    assert seeded_starts([120, 120], 7)[0] == seeded_starts([120], 7)[0]  # independent of the batch
    assert seeded_starts([1000], 7) != seeded_starts([1000], 8)


def test_farthest_points_takes_the_lowest_index_among_ties_and_skips_duplicates() -> None:
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]]])
    # from 0: 1, 2, 3 tie at 1 -> 1; then 2 and 3 tie (1 < 4, 1 < 2) -> 2; then 3; duplicates (4, 5) come last
    assert farthest_points(xyz, 4, torch.tensor([0])).tolist() == [[0, 1, 2, 3]]
    chosen = farthest_points(xyz, 5, torch.tensor([3]))[0].tolist()
    # from 3: 1, 2 and 4 tie at 2 -> 1; then 2 (the copy 4 of 1 is at 0 now); then 0 before its copy 5; then every
    # point is at distance 0 and the lowest index, 0, is taken again (as upstream: it never checks what it chose)
    assert chosen == [3, 1, 2, 0, 0]


def test_farthest_points_equals_a_float64_loop_where_unambiguous() -> None:
    xyz = cloud(n=300, b=1, seed=5)
    ours = farthest_points(xyz, 40, torch.tensor([17]))[0].tolist()
    x = xyz[0].double()
    chosen, nearest = [17], torch.full((300,), float("inf"), dtype=torch.float64)
    for _ in range(39):
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(-1))
        top2 = nearest.topk(2).values
        assert top2[0] - top2[1] > 1e-6  # unambiguous: fp32 rounding cannot swap the choice
        chosen.append(int(nearest.argmax()))
    assert ours == chosen


def test_nearest_neighbours_equal_brute_force_float64_where_unambiguous() -> None:
    xyz = cloud(n=400, b=2, seed=6)
    centres = xyz[:, :25]
    idx = nearest_neighbours(centres, xyz, 16)
    assert idx.shape == (2, 25, 16)
    checked = 0
    for b, g in itertools.product(range(2), range(25)):
        d = ((xyz[b].double() - centres[b, g].double()) ** 2).sum(-1)
        order = d.argsort()
        if d[order[16]] - d[order[15]] > 1e-5:
            assert set(idx[b, g].tolist()) == set(order[:16].tolist())
            assert g in idx[b, g].tolist()  # a centre is in its own group
            checked += 1
    assert checked >= 45


def test_group_gives_offsets_from_absolute_centres_and_the_encoder_ignores_their_order(tiny: ImageBindModel) -> None:
    xyz = cloud(n=100, b=1, seed=8)
    hood, centres = group(xyz, 10, 6, torch.tensor([0]))
    assert hood.shape == (1, 10, 6, 3) and centres.shape == (1, 10, 3)
    assert torch.equal(centres[0, 0], xyz[0, 0])
    assert (hood.abs().sum(-1) == 0).any(-1).all()  # the centre itself, at offset 0, in every group
    encoder = tiny.point_trunk.point_encoder.encoder
    shuffled = hood[:, :, torch.randperm(6, generator=torch.Generator().manual_seed(0))]
    torch.testing.assert_close(encoder(shuffled), encoder(hood))


def test_bf16_autocast_keeps_fp32_grouping(tiny: ImageBindModel) -> None:
    xyz = cloud(n=200, b=2, seed=9)
    start = torch.tensor([3, 4])
    ref = tiny.embed("point", xyz, start)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiny.embed("point", xyz, start)
    assert F.cosine_similarity(low.float(), ref, dim=-1).min() >= 0.99


def test_bad_clouds_are_refused(tiny: ImageBindModel) -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 3\), got \(1, 50, 4\)"):
        tiny.embed("point", torch.zeros(1, 50, 4))
    with pytest.raises(ValueError, match="10 points is too small: this encoder needs at least 16"):
        tiny.embed("point", cloud(n=10))


def test_encoder_loads_point_weights_from_the_w3d_file_or_beside_another(tmp_path: Path) -> None:
    seeded = ImageBind.load("tiny", device="cpu", dtype="float32", seed=3)  # seeded: all seven branches
    assert seeded.has_points
    full = {k: v.contiguous() for k, v in seeded.model.state_dict().items()}
    w3d, huge = tmp_path / "imagebind_w3D.pth", tmp_path / "imagebind_huge.pth"
    torch.save(full, w3d)
    torch.save({k: v for k, v in full.items() if not k.startswith(POINT_PREFIXES)}, huge)
    clouds = [np.random.default_rng(i).normal(size=(64, 3)).astype(np.float32) for i in range(3)]
    for i, c in enumerate(clouds):
        np.save(tmp_path / f"c{i}.npy", c)
    paths = [str(tmp_path / f"c{i}.npy") for i in range(3)]
    expected = seeded.embed_points(paths, seed=5)
    assert expected.shape == (3, 1024)
    torch.testing.assert_close(seeded.embed_points([torch.from_numpy(c) for c in clouds], seed=5), expected)
    for kwargs in (
        {"checkpoint": str(w3d)},
        {"checkpoint": str(huge), "point_checkpoint": str(w3d)},
        {"seed": 9, "point_checkpoint": str(w3d)},
    ):
        loaded = ImageBind.load("tiny", device="cpu", dtype="float32", **kwargs)
        torch.testing.assert_close(loaded.embed_points(paths, seed=5), expected)
    no_point = ImageBind.load("tiny", checkpoint=str(huge), device="cpu", dtype="float32")
    assert not no_point.has_points
    assert no_point.encoder_id == ImageBind.load("tiny", checkpoint=str(huge), point_checkpoint=str(w3d)).encoder_id
    with pytest.raises(ValueError, match=r"model\.point_checkpoint"):
        no_point.embed_points(paths)
    broken = {k: v for k, v in full.items() if not k.startswith("point_trunk.point_encoder.blocks.blocks.1.")}
    broken["point_trunk.pc_projection"] = torch.zeros(64, 32)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatch) as e:
        ImageBind.load("tiny", checkpoint=str(huge), point_checkpoint=str(tmp_path / "broken.pth"))
    msg = str(e.value)
    assert "broken.pth does not fit this ImageBind's point branch" in msg
    assert "missing: point_trunk.point_encoder.blocks.blocks.1." in msg
    assert "point_trunk.pc_projection (64, 32) vs (64, 64)" in msg


def test_embed_points_options_and_mixed_sizes() -> None:
    enc = ImageBind.load("tiny", device="cpu", dtype="float32", seed=0)
    a, b = cloud(n=80, seed=1)[0] * 5 + 3, cloud(n=120, seed=2)[0]
    out = enc.embed_points([a, b, a], batch_size=8, seed=1)  # sizes differ: batched where they agree
    torch.testing.assert_close(out[0], out[2])
    torch.testing.assert_close(out[1:2], enc.embed_points([b], seed=1))
    normalised = enc.embed_points([a], normalize=True, seed=1)
    centred = (a - a.mean(0)) / (a - a.mean(0)).norm(dim=-1).max()
    torch.testing.assert_close(normalised, enc.embed_points([centred], seed=1), atol=1e-5, rtol=1e-5)
    assert enc.embed_points([a], points=64, seed=1).shape == (1, 1024)


def test_bf16_weights_group_in_fp32_then_cast(tiny: ImageBindModel) -> None:
    # the fixture's BatchNorms have statistics that matter; measured: cosine 0.9999 or above on these clouds
    cpu = torch.device("cpu")
    ref = ImageBind(tiny, None, cpu, torch.float32, "imagebind-tiny-x")
    low = ImageBind(copy.deepcopy(tiny).to(torch.bfloat16), None, cpu, torch.bfloat16, "imagebind-tiny-x")
    assert low.weight_dtype == torch.bfloat16
    clouds = [cloud(n=n, seed=s)[0] * 3 for s, n in ((1, 200), (2, 200), (3, 150))]
    a, b = low.embed_points(clouds, seed=4), ref.embed_points(clouds, seed=4)
    assert a.dtype == torch.float32 and F.cosine_similarity(a, b, dim=-1).min() >= 0.99
    xyz = cloud(n=200, b=2, seed=9)  # the same neighbourhoods are chosen: grouping saw the float32 cloud
    start = torch.tensor([3, 4])
    hood, _ = group(xyz, tiny.cfg.point_groups, tiny.cfg.point_group_size, start)
    seen = {}
    encoder = low.model.point_trunk.point_encoder.encoder
    handle = encoder.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    low.model.embed("point", xyz, start)
    handle.remove()
    assert seen["x"].dtype == torch.bfloat16
    torch.testing.assert_close(seen["x"], hood.to(torch.bfloat16), atol=0, rtol=0)
