"""What `ibllm generate` is asked: requests (inputs, weights, prompt, sampling), their checks and their embeddings."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from model.imagebind.decode import TooManyPixels
from model.imagebind.encoder import ImageBind
from pipelines.errors import InputError

MODALITIES = ("image", "audio", "video", "point", "text")  # text: strings through ImageBind's text tower
NO_READER = ("depth", "thermal", "imu")  # ImageBind modalities generate has no file reader for
FILE_MODALITIES = ("image", "audio", "video", "point")  # point: a 3D point-cloud file (Point-Bind)
POINT_NEEDS_WEIGHTS = (
    "point clouds need Point-Bind's weights: set model.point_checkpoint to imagebind_w3D.pth (the configured "
    "ImageBind checkpoint has no point branch)"
)
TEXT_NEEDS_VOCAB = (
    "text inputs need ImageBind's CLIP BPE vocabulary: set model.imagebind_vocab (bpe_simple_vocab_16e6.txt.gz)"
)


@dataclass(frozen=True)
class PointOptions:
    """How point-cloud files are prepared: Point-Bind's centring and unit-sphere scaling, and resampling to a size
    (both off by default, as ImageBind-LLM's inference)."""

    normalize: bool = False
    resample: int | None = None


class Request(BaseModel):
    """One generation request; a field left out takes the command line's value (or the built-in default)."""

    model_config = ConfigDict(extra="forbid")

    image: list[str] = []
    audio: list[str] = []
    video: list[str] = []
    point: list[str] = []
    text: list[str] = []
    weights: dict[str, float] = {}
    prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    history: list[tuple[str, str]] = []  # earlier (question, answer) turns of the conversation

    @field_validator("history", mode="before")
    @classmethod
    def _turns(cls, value: object) -> object:
        return parse_history(value)

    @field_validator("image", "audio", "video", "point", "text", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for modality, weight in value.items():
            check_weight(modality, weight)
        return value

    @field_validator("temperature", "top_p", "max_new_tokens")
    @classmethod
    def _not_negative(cls, value: float | None) -> float | None:
        if value is not None and not value >= 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value

    def inputs(self) -> dict[str, list[str]]:
        """The modalities this request gives, in MODALITIES order."""
        return {m: list(getattr(self, m)) for m in MODALITIES if getattr(self, m)}


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
HISTORY_FORMS = (
    'a conversation is [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...] (OpenAI), '
    '[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...] (ShareGPT) or [[question, answer], ...]'
)


def parse_history(value: object) -> list[tuple[str, str]]:
    """Earlier turns as (question, answer) pairs from any of HISTORY_FORMS; ValueError naming the bad turn.

    Messages alternate user, assistant from a user message and end with an answer; system messages are not taken
    (the template has its own system line).
    """
    if not isinstance(value, list):
        raise ValueError(f"not a list: {HISTORY_FORMS}")
    if all(isinstance(v, (list, tuple)) for v in value):
        pairs = []
        for i, pair in enumerate(value):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"turn {i} is not a [question, answer] pair of strings: {str(pair)[:80]}")
            pairs.append((pair[0], pair[1]))
        return pairs
    texts = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object: {HISTORY_FORMS}")
        role, text = message.get("role", message.get("from")), message.get("content", message.get("value"))
        if role not in ROLES or not isinstance(text, str):
            kind = type(text).__name__
            raise ValueError(f"message {i} has role {role!r} and content of type {kind}: {HISTORY_FORMS}")
        if ROLES[role] != ("user", "assistant")[i % 2]:
            raise ValueError(f"message {i} is from {role!r}: messages alternate user, assistant from a user message")
        texts.append(text)
    if len(texts) % 2:
        raise ValueError("the history ends with a user message: it holds finished turns; put the question in prompt")
    return list(zip(texts[::2], texts[1::2], strict=True))


def read_history(path: str) -> list[tuple[str, str]]:
    """The turns of a conversation file (JSON, any of HISTORY_FORMS), or an InputError naming the file."""
    if not os.path.isfile(path):
        raise InputError(f"history file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_history(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({e})") from None
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def check_weight(modality: str, weight: float) -> None:
    """Refuse a weight of an unknown modality, or one that is negative or not finite."""
    if modality not in MODALITIES:
        raise InputError(f"weight of unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
    if not (math.isfinite(weight) and weight >= 0):
        raise InputError(f"the weight of {modality} must be a finite number >= 0, got {weight}")


def parse_weights(specs: list[str]) -> dict[str, float]:
    """`["image=1", "audio=0.5"]` -> {"image": 1.0, "audio": 0.5} (the --weight options)."""
    weights: dict[str, float] = {}
    for spec in specs:
        modality, sep, value = spec.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or weight is None:
            raise InputError(f"--weight {spec!r}: expected MODALITY=NUMBER, e.g. image=1 or audio=0.5")
        check_weight(modality.strip(), weight)
        weights[modality.strip()] = weight
    return weights


def parse_request(line: str, number: int) -> Request:
    """One JSON line of a requests file (`number` counts from 1), or an InputError naming the line and the problem."""
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"line {number}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"line {number}: expected a JSON object, got {type(doc).__name__}")
    try:
        request = make_request(doc)
        check_weighted_inputs(request)
        return request
    except InputError as e:
        raise InputError(f"line {number}: {e}") from None


def make_request(fields: dict[str, Any]) -> Request:
    """A Request from plain fields, or an InputError naming each bad field and why."""
    for name in fields:
        if name in NO_READER:
            raise InputError(
                f"{name}: generate takes {', '.join(MODALITIES)} inputs; ImageBind encodes depth, "
                "thermal and IMU (model.imagebind), but generate has no file reader for them"
            )
        if name not in Request.model_fields:
            raise InputError(f"{name}: unknown field; a request has {', '.join(Request.model_fields)}")
    try:
        return Request.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'request'}: {_reason(err)}" for err in e.errors())
        raise InputError(problems) from None


def check_weighted_inputs(request: Request) -> None:
    """Refuse a weight of a modality the request gives no input of (a typo, or a forgotten file)."""
    for modality, weight in request.weights.items():
        if not getattr(request, modality):
            raise InputError(f"weight {modality}={weight:g} given, but no {modality} input")


def _reason(err: dict) -> str:
    cause = (err.get("ctx") or {}).get("error")
    return str(cause) if cause is not None else str(err["msg"])


def read_requests(path: str) -> list[tuple[int, Request | InputError]]:
    """(line number, request or the error of that line) for each non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise InputError(f"requests file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out: list[tuple[int, Request | InputError]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((number, parse_request(line, number)))
        except InputError as e:
            out.append((number, e))
    if not out:
        raise InputError(f"{path}: no requests (one JSON object per line)")
    return out


def merge(defaults: Request, line: Request) -> Request:
    """A request line over the command line's values (weights merged, the line's winning)."""
    update = {k: getattr(line, k) for k in line.model_fields_set}
    update["weights"] = {**defaults.weights, **line.weights}
    return defaults.model_copy(update=update)


def file_requests(defaults: Request, path: str) -> list[tuple[int, Request | InputError]]:
    """The lines of a `--requests` file over the command line's values; its inputs come from the file only."""
    if defaults.inputs():
        raise InputError(
            "--requests reads the inputs from the file: drop --image, --audio, --video, --point-cloud and --text"
        )
    return [(n, r if isinstance(r, InputError) else merge(defaults, r)) for n, r in read_requests(path)]


def check_request(request: Request) -> None:
    """A request has something to answer and every input file it names exists."""
    if not request.inputs() and not request.prompt:
        raise InputError("nothing to answer: give a prompt, inputs (image, audio, video, point, text), or both")
    check_files(request)


def check_files(request: Request) -> None:
    """Every input file exists and is a file (a missing one or a folder is named before anything is decoded)."""
    for modality in FILE_MODALITIES:
        for path in getattr(request, modality):
            if os.path.isdir(path):
                raise InputError(f"{modality} {path} is a directory, not a file: give the {modality} file itself")
            if not os.path.isfile(path):
                raise InputError(f"{modality} file not found: {path}")


def embed_request(
    encoder: ImageBind, request: Request, max_pixels: int | None = None, points: PointOptions | None = None
) -> dict[str, torch.Tensor]:
    """modality -> (1, dim) ImageBind embedding; several inputs of one modality are averaged (then normalised).
    An image, or video frames, above `max_pixels` pixels (model.max_image_pixels) is refused before decoding;
    point clouds are read as `points` says (model.point_normalize, model.point_resample; the request's seed)."""
    check_files(request)
    points = points or PointOptions()
    embedders: dict[str, Callable] = {
        "image": functools.partial(encoder.embed_images, max_pixels=max_pixels),
        "audio": encoder.embed_audio,
        "video": functools.partial(encoder.embed_video, max_pixels=max_pixels),
        "text": encoder.embed_texts,
        "point": functools.partial(
            encoder.embed_points, normalize=points.normalize, points=points.resample, seed=request.seed or 0
        ),
    }
    out = {}
    for modality, items in request.inputs().items():
        if modality == "text" and encoder.tokenizer is None:
            raise InputError(TEXT_NEEDS_VOCAB)
        if modality == "point" and not encoder.has_points:
            raise InputError(POINT_NEEDS_WEIGHTS)
        rows = []
        for item in items:
            try:
                rows.append(embedders[modality]([item]))
            except FileNotFoundError as e:
                raise InputError(f"{modality} file not found: {item} ({e})") from None
            except TooManyPixels as e:  # names the file and its size
                raise InputError(f"{e}; model.max_image_pixels sets the limit") from None
            except ValueError as e:  # the decoders' errors name the file and say why
                raise InputError(f"unreadable {modality} {item}: {e}") from None
        out[modality] = F.normalize(torch.cat(rows).mean(0, keepdim=True), dim=-1)
    return out


def weighted_embeddings(
    encoder: ImageBind, request: Request, max_pixels: int | None = None, points: PointOptions | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`embed_request`'s embeddings and each modality's weight (1 unless the request says); InputError when the
    weights sum to 0."""
    embeddings = embed_request(encoder, request, max_pixels, points)
    weights = {m: request.weights.get(m, 1.0) for m in embeddings}
    if sum(weights.values()) <= 0:
        raise InputError(f"the weights of the inputs ({weights}) sum to 0: give one a positive weight")
    return embeddings, weights
