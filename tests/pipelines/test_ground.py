"""`generate --ground`: an answer's phrases found in its image, the annotated PNG, the CLI end to end, the HTTP API."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from model.errors import ModelInputError
from pipelines.apps.ground import Grounder, GroundOptions, annotated_path
from pipelines.apps.nouns import noun_phrases
from pipelines.config import Config, with_settings
from pipelines.errors import InputError
from pipelines.serve import stage as serve
from tests.model.tiny_detectors import owlv2_folder
from tests.pipelines.test_infer import cli, trained  # noqa: F401 (the module's fixture)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(owlv2_folder(tmp_path_factory.mktemp("owlv2") / "owlv2"))


def test_an_answer_is_grounded_in_its_image(detector: str, tmp_path: Path) -> None:
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)).save(image)
    cfg = Config.from_yaml(None, [f"workspace={tmp_path / 'ws'}", f"model.detector={detector}"])
    out = tmp_path / "drawn" / "annotated.png"
    grounder = Grounder(cfg, GroundOptions(threshold=0.0, out=str(out)))
    found = grounder.ground("A brown dog is running on the beach next to a red ball.", [str(image)])
    assert found.phrases == ["brown dog", "beach", "red ball"] and found.image == str(image)
    assert len(found.boxes) == 8 and {b.phrase for b in found.boxes} <= set(found.phrases)
    assert all(0 <= b.box[0] < b.box[2] <= 60 and 0 <= b.box[1] < b.box[3] <= 30 for b in found.boxes)
    assert found.annotated == str(out) and Image.open(out).size == (60, 30)
    assert sorted(p.name for p in out.parent.iterdir()) == ["annotated.png"]  # written through a renamed temp file
    assert not np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(image)))  # drawn on
    fewer = grounder.ground("A brown dog is running on the beach next to a red ball.", [str(image)], threshold=0.5)
    assert [b for b in found.boxes if b.score >= 0.5] == fewer.boxes
    assert grounder.ground("A dog.", []).skipped == "the request has no image to ground the answer in"
    assert grounder.ground("It is.", [str(image)]).skipped == "the answer names no object"
    assert annotated_path("out/a.png", 3) == "out/a-3.png" and annotated_path("a.png", None) == "a.png"


def test_grounding_needs_a_detector(tmp_path: Path) -> None:
    cfg = Config.from_yaml(None, [f"workspace={tmp_path / 'ws'}"])
    with pytest.raises(InputError, match=r"--ground needs an open-vocabulary detector: set model\.detector"):
        Grounder(cfg, GroundOptions())
    cfg.model.detector = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match=f"model.detector: {tmp_path / 'nowhere'} does not exist"):
        Grounder(cfg, GroundOptions())
    cfg.model.detector = str(tmp_path)
    with pytest.raises(InputError, match="--ground-threshold must be in"):
        Grounder(cfg, GroundOptions(threshold=1.5))
    with pytest.raises(ModelInputError, match=r"has no config\.json: give the folder of a transformers detector"):
        Grounder(cfg, GroundOptions())  # a folder that holds no detector, refused before anything is generated


def test_cli_generate_ground(
    trained: tuple[Config, dict[str, str], str],  # noqa: F811
    detector: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    cfg, f, _ = trained
    out = Path(f["vocab"]).parent / "grounded.png"
    base = cli(cfg, "generate", "--temperature", "0", "--max-new-tokens", "5")
    grounded = [*base, "--set", f"model.detector={detector}", "--ground", "--ground-threshold", "0"]
    assert main([*grounded, "--image", f["jpg"], "--ground-out", str(out), "--json"]) == 0
    answer = json.loads(capfd.readouterr().out)["answers"][0]
    grounding = answer["grounding"]
    assert grounding["image"] == f["jpg"] and grounding["phrases"] == noun_phrases(answer["answer"])
    assert grounding["phrases"], f"the tiny model's caption {answer['answer']!r} names a shape"
    assert grounding["boxes"] and grounding["annotated"] == str(out)
    for b in grounding["boxes"]:
        assert b["phrase"] in grounding["phrases"] and 0 <= b["score"] <= 1
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 80  # the 96 x 80 input's pixels
    assert Image.open(out).size == (96, 80)
    assert main([*grounded, "--image", f["jpg"], "--ground-out", str(out)]) == 4  # not replaced without --force
    assert f"--ground-out {out} exists" in capfd.readouterr().err
    assert main([*grounded, "--prompt", "Say hello.", "--json"]) == 0
    text_only = json.loads(capfd.readouterr().out)["answers"][0]["grounding"]
    assert text_only == {
        "image": None,
        "phrases": [],
        "boxes": [],
        "annotated": None,
        "skipped": "the request has no image to ground the answer in",
    }
    assert main([*base, "--image", f["jpg"], "--ground"]) == 4
    assert "--ground needs an open-vocabulary detector" in capfd.readouterr().err
    assert main([*base, "--image", f["jpg"], "--ground-out", str(out)]) == 4
    assert "--ground-threshold and --ground-out go with --ground" in capfd.readouterr().err
    clip = Path(f["vocab"]).parent / "not-a-detector"  # refused before generating, whatever the answer names
    clip.mkdir(exist_ok=True)
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert main([*base, "--set", f"model.detector={clip}", "--ground", "--prompt", "Say hello."]) == 4
    assert "holds a 'clip' model, not a supported detector" in capfd.readouterr().err


def test_chat_completions_ground(trained: tuple[Config, dict[str, str], str], detector: str) -> None:  # noqa: F811
    cfg, f, _ = trained
    cfg = cfg.model_copy(deep=True)
    cfg.serve.media_root = str(Path(f["jpg"]).parent)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f["jpg"]}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
        "temperature": 0,
        "max_tokens": 5,
    }
    served = serve.build(with_settings(cfg, {"infer.device": "cpu", "infer.dtype": "float32"}))
    try:
        transport = httpx.ASGITransport(app=served.app)
        refused = _post(transport, body | {"ground": True})
        assert refused.status_code == 400 and "set model.detector" in refused.json()["error"]["message"]
    finally:
        served.close()
    cfg.model.detector = detector
    served = serve.build(with_settings(cfg, {"infer.device": "cpu", "infer.dtype": "float32"}))
    try:
        transport = httpx.ASGITransport(app=served.app)
        doc = _post(transport, body | {"ground": True, "ground_threshold": 0}).json()
        answer = doc["choices"][0]["message"]["content"]
        assert doc["grounding"]["phrases"] == noun_phrases(answer) and doc["grounding"]["image"] == f["jpg"]
        assert all(0 <= b["box"][2] <= 96 and 0 <= b["box"][3] <= 80 for b in doc["grounding"]["boxes"])
        assert "grounding" not in _post(transport, body).json()
        assert _post(transport, body | {"ground": True, "stream": True}).status_code == 400
    finally:
        served.close()


def _post(transport: httpx.ASGITransport, body: dict) -> httpx.Response:
    import asyncio

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=60)

    return asyncio.run(go())


def test_ground_task(trained: tuple[Config, dict[str, str], str], detector: str) -> None:  # noqa: F811
    """The Prefect task answers about the image and grounds the answer (its function, without a Prefect server)."""
    from flows.tasks import ground_task

    cfg, f, _ = trained
    cfg = cfg.model_copy(deep=True)
    cfg.model.detector = detector
    cfg.infer.temperature, cfg.infer.max_new_tokens = 0.0, 5
    out = Path(f["vocab"]).parent / "task-grounded.png"
    result = ground_task.fn(cfg, f["jpg"], threshold=0.0, out=str(out))
    (answer,) = result.answers
    assert answer.grounding is not None and answer.grounding.phrases == noun_phrases(answer.answer)
    assert answer.grounding.boxes and Image.open(out).size == (96, 80)
