"""An open-vocabulary detector (OWLv2 or Grounding DINO, transformers) that finds text phrases in an image."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    Owlv2ForObjectDetection,
    Owlv2Processor,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

from model.errors import ModelInputError

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in the input image's pixels


class DetectorError(ModelInputError):
    """A detector folder that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Kind:
    """One supported architecture: its model and processor classes (the PIL image processors: the default "fast"
    ones need torchvision) and whether it pads the image to a square at the bottom and right before resizing (its
    normalised boxes are then relative to the square's side, not to the image's width and height)."""

    model: type
    processor: type
    image_processor: type
    padded_square: bool
    needs: tuple[str, ...] = ()  # importable modules its image processor needs


KINDS: dict[str, Kind] = {
    "owlv2": Kind(Owlv2ForObjectDetection, Owlv2Processor, Owlv2ImageProcessorPil, True, ("scipy",)),
    "grounding-dino": Kind(
        GroundingDinoForObjectDetection, GroundingDinoProcessor, GroundingDinoImageProcessorPil, False
    ),
}
RELEASED = "google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny"


@dataclass(frozen=True)
class Detection:
    """One found phrase: its score in [0, 1] and its box in the input image's pixels."""

    phrase: str
    score: float
    box: Box


def detector_type(path: str) -> str:
    """The `model_type` of the detector folder `path`, or a DetectorError naming it and saying what it lacks."""
    if not os.path.exists(path):
        raise DetectorError(f"detector folder {path} does not exist (download {RELEASED} there first)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise DetectorError(f"{path} has no config.json: give the folder of a transformers detector ({RELEASED})")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise DetectorError(f"{config} is not a transformers config: {e}") from None
    if model_type not in KINDS:
        raise DetectorError(
            f"{path} holds a {model_type!r} model, not a supported detector ({', '.join(KINDS)}): e.g. {RELEASED}"
        )
    return model_type


class Detector:
    """A loaded open-vocabulary detector: `detect(image, phrases)` finds each phrase's boxes."""

    def __init__(self, model: torch.nn.Module, processor: Any, kind: Kind, path: str) -> None:
        self.model, self.processor, self.kind, self.path = model, processor, kind, path

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> Detector:
        """The detector saved in folder `path` (no download); DetectorError naming the folder when it cannot be."""
        kind = KINDS[detector_type(path)]
        for module in kind.needs:
            if importlib.util.find_spec(module) is None:
                raise DetectorError(f"{path}: its image processor needs {module} (pip install {module})")
        try:
            model = kind.model.from_pretrained(path, local_files_only=True, use_safetensors=True)
            image_processor = kind.image_processor.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DetectorError(f"cannot load the detector in {path}: {e}") from None
        processor = kind.processor(image_processor=image_processor, tokenizer=tokenizer)
        return cls(model.to(device).eval(), processor, kind, path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def detect(
        self, image: Image.Image, phrases: Sequence[str], threshold: float = 0.1, nms_iou: float = 0.5
    ) -> list[Detection]:
        """Boxes of `phrases` in `image` scoring at least `threshold`, best first: each box is given to the phrase
        it scores highest on, and of a phrase's boxes overlapping by more than `nms_iou` only the best is kept."""
        if not phrases:
            return []
        image = image.convert("RGB")
        scores, boxes = (t.cpu() for t in self._raw(image, list(phrases)))  # (N, P) in [0, 1]; (N, 4) cx, cy, w, h
        best, which = scores.max(dim=-1)
        pixels = to_pixels(boxes, image.width, image.height, self.kind.padded_square)
        keep = (best >= threshold) & (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
        found = []
        for p, phrase in enumerate(phrases):
            mine = torch.nonzero(keep & (which == p)).flatten()
            for i in mine[nms(pixels[mine], best[mine], nms_iou)].tolist():
                box = tuple(round(v, 2) for v in pixels[i].tolist())
                found.append(Detection(phrase, round(float(best[i]), 4), box))  # type: ignore[arg-type]
        return sorted(found, key=lambda d: (-d.score, d.phrase, d.box))

    def _raw(self, image: Image.Image, phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, Owlv2ForObjectDetection):
            inputs = self.processor(
                text=[phrases], images=image, return_tensors="pt", padding="max_length", truncation=True
            ).to(self.device)  # a long phrase: its first 16 tokens
            out = self.model(**inputs)
            return out.logits[0].float().sigmoid(), out.pred_boxes[0].float()  # (N, P), (N, 4)
        text, spans = grounding_prompt(phrases)
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        tokens = token_spans(self.processor.tokenizer, text, spans)
        probs = out.logits[0].float().sigmoid()  # (N, max_text_len)
        return torch.stack([probs[:, t].max(dim=-1).values for t in tokens], dim=-1), out.pred_boxes[0].float()


def grounding_prompt(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's text ("brown dog. beach.", lower case) and each phrase's character span in it."""
    text, spans = "", []
    for phrase in phrases:
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase.lower() + ". "
    return text.strip(), spans


def token_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """The token positions of `text` (as the model reads it) inside each character span."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    out = []
    for start, end in spans:
        inside = [t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
        if not inside:
            raise ValueError(f"no token of {text[start:end]!r} in the detector's prompt")
        out.append(inside)
    return out


def to_pixels(boxes: torch.Tensor, width: int, height: int, padded_square: bool) -> torch.Tensor:
    """(N, 4) normalised cx, cy, w, h -> (N, 4) x0, y0, x1, y1 in pixels of a `width` x `height` image, clipped to it.

    A detector that pads to a square at the bottom and right (OWLv2) gives coordinates relative to the square's side
    max(width, height) on both axes; one that resizes the image itself (Grounding DINO), relative to each axis.
    """
    sx, sy = (max(width, height),) * 2 if padded_square else (width, height)
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], dim=-1)
    limit = torch.tensor([width, height, width, height], dtype=corners.dtype)
    return torch.minimum(corners.clamp(min=0), limit)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best first: (N, 4) x0, y0, x1, y1; (N,)."""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept: list[int] = []
    for i in order.tolist():
        if kept:
            other = boxes[kept]
            wh = (torch.minimum(other[:, 2:], boxes[i, 2:]) - torch.maximum(other[:, :2], boxes[i, :2])).clamp(min=0)
            inter = wh[:, 0] * wh[:, 1]
            if (inter / (area[kept] + area[i] - inter)).max() > iou:
                continue
        kept.append(i)
    return torch.tensor(kept, dtype=torch.long)
