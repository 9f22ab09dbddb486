"""Grounding answers (`generate --ground`): the answer's noun phrases found in its input image, boxes drawn on it."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel

from model.imagebind.decode import TooManyPixels, load_image
from model.imagebind.encoder import resolve_device
from pipelines.apps.nouns import noun_phrases
from pipelines.apps.output import png_bytes, write_file
from pipelines.config import Config
from pipelines.errors import InputError

if TYPE_CHECKING:  # the detector's transformers classes load with the detector, not with every `ibllm` command
    from model.apps.detect import Detector

log = logging.getLogger(__name__)
NO_DETECTOR = (
    "--ground needs an open-vocabulary detector: set model.detector to a transformers OWLv2 or Grounding "
    "DINO folder (e.g. google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny, downloaded "
    "beforehand)"
)
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


class GroundBox(BaseModel):
    """One phrase found in the image: its score in [0, 1] and box [x0, y0, x1, y1] in the image's pixels."""

    phrase: str
    score: float
    box: list[float]


class Grounding(BaseModel):
    """An answer's phrases and where they are in its image (or why it was not grounded)."""

    image: str | None = None
    phrases: list[str] = []
    boxes: list[GroundBox] = []
    annotated: str | None = None
    skipped: str | None = None

    def summary(self) -> str:
        """One line per box, or why there are none."""
        if self.skipped:
            return f"grounding skipped: {self.skipped}"
        lines = [f"{b.phrase}\t{b.score:.3f}\t[{', '.join(f'{v:g}' for v in b.box)}]" for b in self.boxes]
        return "\n".join(lines + ([f"annotated: {self.annotated}"] if self.annotated else [])) or "no boxes"


@dataclass(frozen=True)
class GroundOptions:
    """How answers are grounded: the lowest score kept, the overlap above which a phrase's weaker box is dropped,
    and where the annotated image goes (a batch's line N writes STEM-N.png beside it; none: not drawn)."""

    threshold: float = 0.1
    nms_iou: float = 0.5
    out: str | None = None


def check(cfg: Config, options: GroundOptions) -> None:
    """Refuse grounding before any model is loaded: no detector configured, a folder that holds none, or options
    out of range."""
    if not cfg.model.detector:
        raise InputError(NO_DETECTOR)
    if not os.path.exists(cfg.model.detector):
        raise InputError(f"model.detector: {cfg.model.detector} does not exist")
    for name, value in (("--ground-threshold", options.threshold), ("nms_iou", options.nms_iou)):
        if not 0 <= value <= 1:
            raise InputError(f"{name} must be in [0, 1], got {value}")
    if options.out and not options.out.lower().endswith(".png"):
        raise InputError(f"--ground-out {options.out}: the annotated image is a PNG: give a .png path")
    from model.apps.detect import detector_type  # with transformers: only when grounding is asked for

    detector_type(cfg.model.detector)  # a folder that holds no supported detector is named now, before generating


class Grounder:
    """The configured detector (loaded on first need) grounding answers in their images."""

    def __init__(self, cfg: Config, options: GroundOptions, device: str = "auto") -> None:
        check(cfg, options)
        self.cfg, self.options, self.device = cfg, options, device
        self._detector: Detector | None = None

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            from model.apps.detect import Detector

            self._detector = Detector.load(self.cfg.model.detector or "", resolve_device(self.device))
        return self._detector

    def ground(
        self, answer: str | None, images: Sequence[str], line: int | None = None, threshold: float | None = None
    ) -> Grounding:
        """The answer's phrases found in the first image (the only one, as a rule), drawn into the annotated PNG
        (for line `line` of a batch); `threshold` overrides the options'."""
        if answer is None:
            return Grounding(skipped="no answer")
        if not images:
            return Grounding(skipped="the request has no image to ground the answer in")
        phrases = noun_phrases(answer, self.cfg.model.noun_parser)
        if len(images) > 1:
            log.warning("grounding in the first of %d images: %s", len(images), images[0])
        if not phrases:
            return Grounding(image=images[0], skipped="the answer names no object")
        try:
            image = load_image(images[0], max_pixels=self.cfg.model.max_image_pixels)
        except (TooManyPixels, ValueError, FileNotFoundError) as e:
            raise InputError(f"grounding: {e}") from None
        threshold = self.options.threshold if threshold is None else threshold
        found = self.detector.detect(image, phrases, threshold, self.options.nms_iou)
        boxes = [GroundBox(phrase=d.phrase, score=d.score, box=list(d.box)) for d in found]
        out = annotated_path(self.options.out, line)
        if out:
            annotate(image, boxes, out, self.cfg.storage_options)
        return Grounding(image=images[0], phrases=phrases, boxes=boxes, annotated=out)


def annotated_path(out: str | None, line: int | None) -> str | None:
    """Where a request's annotated image goes: `out` for one request, STEM-LINE.png for line LINE of a batch."""
    if out is None or line is None:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-{line}{ext}"


def annotate(image: Image.Image, boxes: Sequence[GroundBox], out: str, storage_options: dict | None = None) -> None:
    """The image with each box outlined and labelled "phrase score", written to `out` as a PNG atomically."""
    drawn = image.convert("RGB")
    draw = ImageDraw.Draw(drawn)
    font = ImageFont.load_default()
    width = max(1, round(max(drawn.size) / 300))
    colour_of: dict[str, str] = {}
    for b in boxes:
        colour = colour_of.setdefault(b.phrase, COLOURS[len(colour_of) % len(COLOURS)])
        x0, y0, x1, y1 = b.box
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        label = f"{b.phrase} {b.score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        top_at = y0 - (bottom - top) if y0 >= bottom - top else y0  # above the box when there is room
        draw.rectangle((x0, top_at, x0 + right - left, top_at + bottom - top), fill=colour)
        draw.text((x0, top_at - (top - y0)), label, fill="white", font=font)
    write_file(out, png_bytes(drawn), storage_options or {})
