"""Stable unCLIP on embeddings: drawing, seeds, the conditioning the UNet receives, and the refusals of bad folders."""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.apps.unclip import Drawing, MissingExtra, UnCLIP, _diffusers, check_folder
from model.errors import ModelInputError
from tests.model.tiny_unclip import unclip_folder  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
DIM = 1024
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unclip(unclip_folder: Path) -> UnCLIP:  # noqa: F811
    return UnCLIP.load(str(unclip_folder), DIM, CPU, torch.float32)


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_draws_seeded_images_per_request(unclip: UnCLIP) -> None:
    e = torch.randn(2, DIM, generator=torch.Generator().manual_seed(0))
    drawn = unclip.draw([Drawing(e[0], seed=1), Drawing(e[1], seed=5, prompt="th")], images=2, steps=2)
    assert [[im.size for im in row] for row in drawn] == [[(16, 16)] * 2] * 2 and drawn[0][0].mode == "RGB"
    again = unclip.draw([Drawing(e[0], seed=1)], images=2, steps=2)[0]
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(again, drawn[0], strict=True))  # same seed, same pixels
    assert np.abs(pixels(drawn[0][0]) - pixels(drawn[0][1])).max() > 0  # image 1 starts from seed + 1
    other = unclip.draw([Drawing(e[0], seed=2)], steps=2)[0][0]
    assert np.abs(pixels(other) - pixels(drawn[0][0])).max() > 0
    bigger = unclip.draw([Drawing(e[0], seed=1)], steps=1, size=24)[0][0]
    assert bigger.size == (24, 24)


def test_the_unet_is_conditioned_on_the_scaled_embedding(unclip: UnCLIP) -> None:
    """class_labels = [zeros (guidance) ; unscale(noise(scale(e / |e| * norm))), timestep embedding of level 0]."""
    normalizer = unclip.pipe.image_normalizer
    mean, std = normalizer.mean.detach().double(), normalizer.std.detach().double()
    assert unclip.norm == pytest.approx(math.sqrt(float((mean**2 + std**2).sum())))
    assert unclip.norm > 10  # random statistics: not the norm 1 of ImageBind's embeddings
    seen = []
    unet = unclip.pipe.unet
    hook = unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"]), with_kwargs=True)
    try:
        e = torch.randn(DIM, generator=torch.Generator().manual_seed(3)) * 0.3  # any norm: only the direction counts
        unclip.draw([Drawing(e, seed=7)], steps=2, guidance=3.0, noise_level=0)
    finally:
        hook.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # the same conditioning at every step
    labels = seen[0].double()  # (2, 2 * DIM): unconditional, conditional
    assert labels.shape == (2, 2 * DIM) and not labels[0].any()
    alpha = unclip.pipe.image_noising_scheduler.alphas_cumprod[0].double()  # DDPM at t = 0
    noise = torch.randn((1, DIM), generator=torch.Generator().manual_seed(7)).double()  # the request's seed
    x = F.normalize(e.double(), dim=0) * unclip.norm
    expected = ((alpha.sqrt() * (x - mean) / std + (1 - alpha).sqrt() * noise) * std + mean)[0]
    assert torch.allclose(labels[1, :DIM], expected, atol=1e-4)
    assert (labels[1, :DIM] - x).abs().max() < 0.1  # at level 0 the noise is small: the embedding arrives nearly as is
    assert labels[1, DIM:].tolist() == [1.0] * (DIM // 2) + [0.0] * (DIM // 2)  # cos then sin of level 0


def test_a_configured_norm_replaces_the_statistics(unclip_folder: Path) -> None:  # noqa: F811
    fixed = UnCLIP.load(str(unclip_folder), DIM, CPU, torch.float32, norm=7.5)
    out = fixed.condition(torch.tensor([[3.0, 4.0] + [0.0] * (DIM - 2)]))
    assert out[0, :2].tolist() == pytest.approx([4.5, 6.0]) and fixed.norm == 7.5


def test_the_image_encoder_is_never_loaded(unclip_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    """As released, the folder names an image encoder; it is not read (here it is absent)."""
    folder = tmp_path / "released-like"
    shutil.copytree(unclip_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index |= {
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = UnCLIP.load(str(folder), DIM, CPU, torch.float32)
    assert loaded.pipe.image_encoder is None and loaded.dim == DIM


def test_bad_folders_are_named(unclip_folder: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ModelInputError, match=re.escape(f"generator folder not found: {tmp_path / 'nowhere'}")):
        check_folder(str(tmp_path / "nowhere"))
    with pytest.raises(ModelInputError, match=re.escape(f"{tmp_path} is not a diffusers pipeline folder")):
        check_folder(str(tmp_path))
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelInputError, match="holds a StableDiffusionPipeline pipeline, not a Stable unCLIP"):
        check_folder(str(other))
    with pytest.raises(
        ModelInputError,
        match=re.escape(f"generator {unclip_folder} takes 1024-d image embeddings, ImageBind gives 768-d"),
    ):
        UnCLIP.load(str(unclip_folder), 768, CPU, torch.float32)
    pickled = tmp_path / "pickled"
    shutil.copytree(unclip_folder, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelInputError, match=r"unet has only pickled \.bin weights; ibllm loads safetensors only"):
        check_folder(str(pickled))


def test_diffusers_is_imported_lazily_and_only_in_model_apps() -> None:
    code = "import sys, model.apps.unclip; print('diffusers' in sys.modules)"  # the only importer, see below
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    importers = []
    for layer in ("flows", "pipelines", "model", "stores"):
        for path in (ROOT / layer).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            if any(n.split(".")[0] == "diffusers" for n in names):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == ["model/apps/unclip.py"]


def test_without_diffusers_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(MissingExtra, match=re.escape("pip install 'ibllm[apps]'")):
        _diffusers()
