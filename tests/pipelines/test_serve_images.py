"""POST /v1/images/generations: the chat API's media parts in, base64 PNGs out, seeded; bad bodies refused."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.apps import imagine
from pipelines.config import Config
from pipelines.demo import synthetic_media as media
from pipelines.serve.app import Limits
from pipelines.serve.images import add_image_routes
from tests.model.tiny_unclip import unclip_folder  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, unclip_folder: Path) -> TestClient:  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve-images")
    cfg = Config.from_yaml(None, [f"workspace={tmp / 'ws'}", f"imagine.generator={unclip_folder}", "imagine.steps=1"])
    app = FastAPI()
    (tmp / "scratch").mkdir()
    add_image_routes(app, imagine.load(cfg), str(tmp / "scratch"), Limits(media_root=str(tmp)))
    media.draw_shape((64, 64), "square", "blue", "grey", 0.6, 1).save(tmp / "shape.png")
    return TestClient(app)


def png_part() -> dict:
    buf = io.BytesIO()
    media.draw_shape((64, 64), "circle", "red", "grey", 0.6, 0).save(buf, format="PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
    }


def test_images_from_parts_are_seeded_pngs(client: TestClient) -> None:
    body = {"input": [png_part()], "n": 2, "seed": 3, "prompt": "th"}  # prompt: unCLIP's own text
    first = client.post("/v1/images/generations", json=body)
    assert first.status_code == 200, first.text
    data = first.json()["data"]
    assert [d["seed"] for d in data] == [3, 4]
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
    assert all(im.format == "PNG" and im.size == (16, 16) for im in images)
    again = client.post("/v1/images/generations", json=body).json()["data"]
    assert [d["b64_json"] for d in again] == [d["b64_json"] for d in data]
    on_disk = client.post(
        "/v1/images/generations", json={"input": [{"type": "image_url", "image_url": {"url": "shape.png"}}]}
    )
    assert on_disk.status_code == 200 and len(on_disk.json()["data"]) == 1


def test_bad_bodies_are_refused(client: TestClient) -> None:
    post = lambda doc: client.post("/v1/images/generations", json=doc)  # noqa: E731
    assert post({"input": [png_part()], "n": 0}).status_code == 400
    assert "weights: audio given" in post({"input": [png_part()], "weights": {"audio": 1}}).json()["error"]["message"]
    outside = post({"input": [{"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]})
    assert outside.status_code == 403
    text = post({"input": [{"type": "text", "text": "a cat"}]})  # text parts: ImageBind's text tower, here no vocab
    assert text.status_code == 400 and "CLIP BPE vocabulary" in text.json()["error"]["message"]
    assert client.post("/v1/images/generations", content=b"{not json").status_code == 400
