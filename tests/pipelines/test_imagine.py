"""`ibllm imagine`: embeddings mixed as generation mixes them, PNGs written and numbered, seeds, batches, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.errors import ModelInputError
from model.llm.cache import cache_mix
from pipelines.apps import imagine
from pipelines.config import Config, with_settings
from pipelines.demo import synthetic_media as media
from pipelines.errors import InputError
from pipelines.runtime.inputs import Request
from stores import features
from stores.index import BuildSettings, build
from stores.workspace import Workspace
from tests.model.tiny_unclip import unclip_folder  # noqa: F401 (a fixture)

DIM, ENCODER = 1024, "imagebind-tiny-init0"  # the demo config's tiny ImageBind (seed 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, unclip_folder: Path) -> tuple[Config, dict[str, str]]:  # noqa: F811
    """The demo config with the tiny generator, a small cache index of the tiny encoder's size, an image and a sound."""
    tmp = tmp_path_factory.mktemp("imagine")
    cfg = Config.from_yaml(
        None,
        [f"workspace={tmp / 'ws'}", f"imagine.generator={unclip_folder}", "imagine.steps=2", "index.values=float32"],
    )
    rng = np.random.default_rng(0)
    cached = rng.normal(size=(64, DIM)).astype(np.float32)
    cached /= np.linalg.norm(cached, axis=1, keepdims=True)
    part = str(tmp / "part-00000.parquet")
    features.write_features(
        part,
        {
            "uid": [f"u{i}" for i in range(64)],
            "source": ["s"] * 64,
            "caption": [f"c{i}" for i in range(64)],
            "url": [f"http://x/{i}" for i in range(64)],
            "image_emb": cached,
            "text_emb": cached,
            "clip_score": np.zeros(64),
            "encoder_id": [ENCODER] * 64,
        },
        DIM,
    )
    build(
        Workspace(cfg.workspace),
        cfg.index.name,
        [part],
        ENCODER,
        DIM,
        "fp",
        BuildSettings(index_key="Flat", holdout=8, values="float32"),
    )
    files = {"jpg": tmp / "shape.jpg", "wav": tmp / "tone.wav"}
    media.draw_shape((96, 80), "circle", "red", "grey", 0.6, 0).save(files["jpg"])
    files["wav"].write_bytes(media.tone_wav(1.0, 16000, 1, 440.0))
    return cfg, {k: str(v) for k, v in files.items()}


def test_one_request_writes_its_png_and_again_the_same(setup: tuple[Config, dict[str, str]], tmp_path: Path) -> None:
    cfg, f = setup
    out = str(tmp_path / "picture.png")
    mix = Request(image=[f["jpg"]], audio=[f["wav"]], weights={"audio": 0.5}, seed=3)
    cfg = with_settings(cfg, {"infer.use_cache": True})
    result = imagine.run(cfg, mix, out=out)
    assert [p.paths for p in result.pictures] == [[out]] and result.summary() == out and result.errors == 0
    assert result.cache == "cache" and result.encoder_id == ENCODER and result.steps == 2
    assert result.pictures[0].weights == {"image": 1.0, "audio": 0.5} and result.pictures[0].seed == 3
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (16, 16)
    first = Path(out).read_bytes()
    with pytest.raises(InputError, match=re.escape(f"{out} exists (1 of the outputs do): add --force")):
        imagine.run(cfg, mix, out=out)
    imagine.run(cfg, mix, out=out, force=True)
    assert Path(out).read_bytes() == first  # the same seed: the same pixels
    imagine.run(cfg, mix.model_copy(update={"seed": 4}), out=out, force=True)
    assert Path(out).read_bytes() != first


def test_the_embedding_is_mixed_as_generation_mixes_it(setup: tuple[Config, dict[str, str]]) -> None:
    cfg, f = setup
    imaginer = imagine.load(with_settings(cfg, {"infer.use_cache": True}))
    req = Request(image=[f["jpg"]], audio=[f["wav"]], weights={"audio": 0.5})
    image = imaginer.encoder.embed_images([f["jpg"]])[0]
    audio = imaginer.encoder.embed_audio([f["wav"]])[0]
    plain = imaginer.embedding(req, use_cache=False)
    assert torch.allclose(plain, (image + 0.5 * audio) / (1.5 + 1e-6), atol=1e-6)  # unit inputs, not re-normalised
    sims, values = imaginer.cache(plain[None])
    expected = cache_mix(plain[None], sims, values, cfg.index.cache_t, cfg.index.cache_weight)[0]
    assert torch.allclose(imaginer.embedding(req), expected, atol=1e-6)
    assert not torch.allclose(expected, torch.nn.functional.normalize(plain, dim=0), atol=1e-3)  # the cache moved it
    with pytest.raises(InputError, match="sum to 0"):
        imaginer.embedding(Request(image=[f["jpg"]], weights={"image": 0}))


def test_requests_and_several_images_are_numbered(setup: tuple[Config, dict[str, str]], tmp_path: Path) -> None:
    cfg, f = setup
    cfg = cfg.model_copy(deep=True)
    cfg.imagine.images, cfg.imagine.batch = 2, 2
    lines = [
        {"image": f["jpg"]},
        {"audio": f["wav"], "seed": 9, "prompt": "th"},
        {"prompt": "no inputs"},
        {"image": str(tmp_path / "nowhere.jpg")},
        {"image": f["jpg"]},
    ]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = str(tmp_path / "out" / "pic.png")
    result = imagine.run(cfg, Request(seed=1), out=out, requests_file=str(tmp_path / "requests.jsonl"))
    paths = [p.paths for p in result.pictures]
    stem = str(tmp_path / "out" / "pic")
    assert paths == [
        [f"{stem}-1-0.png", f"{stem}-1-1.png"],
        [f"{stem}-2-0.png", f"{stem}-2-1.png"],
        [],
        [],
        [f"{stem}-5-0.png", f"{stem}-5-1.png"],
    ]
    assert [p.seed for p in result.pictures][:2] == [1, 9] and result.errors == 2
    assert result.pictures[2].error == f"line 3: {imagine.NOTHING}"
    assert result.pictures[3].error == f"line 4: image file not found: {tmp_path / 'nowhere.jpg'}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(p).name for row in paths for p in row]
    same = [np.asarray(Image.open(p)) for p in (*paths[0], *paths[4])]
    assert (same[0] == same[2]).all() and (same[1] == same[3]).all()  # lines 1 and 5: one request, one seed
    assert not (same[0] == same[1]).all()  # its second image: seed + 1


def test_clear_errors_before_any_model_loads(setup: tuple[Config, dict[str, str]], tmp_path: Path) -> None:
    cfg, f = setup
    req = Request(image=[f["jpg"]])
    with pytest.raises(InputError, match="nothing to imagine from"):
        imagine.run(cfg, Request(prompt="a cat"), out=str(tmp_path / "x.png"))
    bare = cfg.model_copy(deep=True)
    bare.imagine.generator = None
    with pytest.raises(InputError, match=r"no generator: set imagine\.generator"):
        imagine.run(bare, req, out=str(tmp_path / "x.png"))
    with pytest.raises(ModelInputError, match=re.escape(f"generator folder not found: {tmp_path / 'sd'}")):
        imagine.run(with_settings(cfg, {"imagine.generator": str(tmp_path / "sd")}), req, out=str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
