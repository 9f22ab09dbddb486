"""The open-vocabulary detector: OWLv2 and Grounding DINO from a folder, boxes in image pixels, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.apps.detect import Detector, DetectorError, grounding_prompt, nms, to_pixels, token_spans
from tests.model.tiny_detectors import OWL_PATCH, OWL_SIDE, grounding_dino_folder, owlv2_folder

PHRASES = ["red dog", "beach", "ball"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("detectors")
    return {"owlv2": owlv2_folder(tmp / "owlv2"), "grounding-dino": grounding_dino_folder(tmp / "gdino")}


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["owlv2", "grounding-dino"])
def test_boxes_are_scored_phrases_inside_the_image_and_deterministic(folders: dict[str, Path], kind: str) -> None:
    image = noise(60, 30)
    found = Detector.load(str(folders[kind])).detect(image, PHRASES, threshold=0.0)
    assert found, "threshold 0 keeps every box that is inside the image"
    for d in found:
        x0, y0, x1, y1 = d.box
        assert d.phrase in PHRASES and 0 <= d.score <= 1
        assert 0 <= x0 < x1 <= 60 and 0 <= y0 < y1 <= 30
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    again = Detector.load(str(folders[kind])).detect(image, PHRASES, threshold=0.0)  # a fresh load, the same boxes
    assert again == found
    scores = sorted({d.score for d in found})
    middle = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # between two scores (they are rounded)
    kept = Detector.load(str(folders[kind])).detect(image, PHRASES, threshold=middle)
    assert kept == [d for d in found if d.score >= middle] and 0 < len(kept) <= len(found)
    assert Detector.load(str(folders[kind])).detect(image, PHRASES, threshold=1.0) == []
    assert Detector.load(str(folders[kind])).detect(image, [], threshold=0.0) == []


def test_owlv2_boxes_are_in_the_original_images_pixels(folders: dict[str, Path]) -> None:
    """OWLv2 pads a 60 x 30 image to 60 x 60 at the bottom: its (zeroed-head) boxes are the patch grid of that
    square, each a patch wide and centred on a patch's bottom-right corner; rows in the padding are dropped and
    the rest clipped to the image."""
    n, side = OWL_SIDE // OWL_PATCH, 60
    step = side / n
    expected = sorted(
        (step * (j + 0.5), step * (i + 0.5), min(step * (j + 1.5), 60), min(step * (i + 1.5), 30))
        for i in range(n)
        for j in range(n)
        if step * (i + 0.5) < 30
    )
    found = Detector.load(str(folders["owlv2"])).detect(noise(60, 30), PHRASES, threshold=0.0)
    assert len(expected) == 8 and len(found) == len(expected)
    got = sorted(d.box for d in found)
    assert np.allclose(got, expected, atol=0.05), got


def test_to_pixels_of_padded_and_resized_detectors() -> None:
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])  # cx, cy, w, h
    assert to_pixels(boxes, 200, 100, padded_square=True).tolist() == [[0, 0, 100, 100], [0, 0, 200, 100]]
    assert to_pixels(boxes, 200, 100, padded_square=False).tolist() == [[0, 0, 100, 50], [0, 0, 200, 100]]
    assert to_pixels(boxes, 100, 200, padded_square=True).tolist() == [[0, 0, 100, 100], [0, 0, 100, 200]]


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.5).tolist() == [1, 2]
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.9).tolist() == [1, 2, 0]


def test_grounding_dino_phrases_map_to_their_tokens(folders: dict[str, Path]) -> None:
    text, spans = grounding_prompt(["Red dog", "beach"])
    assert text == "red dog. beach." and [text[a:b] for a, b in spans] == ["red dog", "beach"]
    tokenizer = Detector.load(str(folders["grounding-dino"])).processor.tokenizer
    assert token_spans(tokenizer, text, spans) == [[1, 2], [4]]  # [CLS] red dog . beach . [SEP]


def test_unusable_folders_are_refused_naming_them(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match=f"detector folder {tmp_path / 'nowhere'} does not exist"):
        Detector.load(str(tmp_path / "nowhere"))
    with pytest.raises(DetectorError, match=f"{tmp_path} has no config.json"):
        Detector.load(str(tmp_path))
    other = tmp_path / "clip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(DetectorError, match=r"holds a 'clip' model, not a supported detector \(owlv2, grounding-dino"):
        Detector.load(str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folders["owlv2"] / "config.json").read_text())
    with pytest.raises(DetectorError, match=f"cannot load the detector in {broken}"):
        Detector.load(str(broken))
