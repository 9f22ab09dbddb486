"""The OpenAI chat-completions format: a request body read into our Request, and the responses and stream chunks."""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.imagebind.point_files import FORMATS
from pipelines.errors import InputError
from pipelines.runtime.inputs import Request, check_weight

# content part type -> (our modality, the key holding the reference, the media types a data: URL may carry)
PARTS = {
    "image_url": ("image", "image_url", ("image/",)),
    "input_audio": ("audio", "input_audio", ("audio/",)),
    "audio_url": ("audio", "audio_url", ("audio/",)),
    "video_url": ("video", "video_url", ("video/",)),
    "point_cloud": ("point", "point_cloud", ()),  # ours: {"data": base64, "format": "ply"}, as input_audio
    "point_cloud_url": ("point", "point_cloud_url", ()),  # ours: a path under the media root
}
AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}
POINT_FORMATS = {f.lstrip("."): f for f in FORMATS}
INLINE = {"input_audio": ("wav", AUDIO_FORMATS), "point_cloud": ("ply", POINT_FORMATS)}  # {data, format} parts
SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/mpeg": ".mp3",
    "audio/flac": ".flac",
    "audio/ogg": ".ogg",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
}


class RefusedPath(InputError):
    """A server-side media path outside the allowed media root (HTTP 403)."""


class ChatBody(BaseModel):
    """POST /v1/chat/completions: OpenAI's fields we honour, plus `cache` and `weights` (ours)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    n: int = 1
    cache: bool | None = None  # the visual cache for this request (default: the server's setting)
    weights: dict[str, float] = {}  # weight of each modality in the mix (default 1 each)
    ground: bool = False  # find the answer's noun phrases in the image: boxes in the response's `grounding`
    ground_threshold: float = Field(0.1, ge=0, le=1)


@dataclass
class Parsed:
    """A chat body as our Request, the files it wrote (data: URLs), and its stream and cache choices."""

    request: Request
    stream: bool
    cache: bool | None
    files: list[str] = field(default_factory=list)
    ground: float | None = None  # the grounding threshold when the answer is to be grounded

    def cleanup(self) -> None:
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def parse_body(doc: Any, media_root: str | None, scratch: str, max_media_bytes: int) -> Parsed:
    """Read a chat-completions body; InputError (RefusedPath for paths outside `media_root`) names the bad field.

    User messages give the question (the last one) and the inputs (every media part of every user message: the
    conversation is about all of them); earlier user/assistant pairs become the history; system messages are not
    used (the prompt template has its own system line). data: URLs are written under `scratch`.
    """
    try:
        body = ChatBody.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise InputError(problems) from None
    if body.n != 1:
        raise InputError(f"n: only one choice per request is generated, got {body.n}")
    for modality, weight in body.weights.items():
        try:
            check_weight(modality, weight)
        except InputError as e:
            raise InputError(f"weights: {e}") from None
    if body.ground and body.stream:
        raise InputError("ground: the boxes come with the whole answer: drop stream")
    parsed = Parsed(Request(), body.stream, body.cache, ground=body.ground_threshold if body.ground else None)
    try:
        turns, inputs = _dialogue(body.messages, media_root, scratch, max_media_bytes, parsed.files)
        *history, (question, _) = turns
        missing = [m for m in body.weights if m not in inputs]
        if missing:
            raise InputError(f"weights: {', '.join(missing)} given, but the messages have no such input")
        parsed.request = Request(
            prompt=question or None,
            history=history,
            weights=body.weights,
            seed=body.seed,
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            **inputs,
        )
    except BaseException:
        parsed.cleanup()
        raise
    return parsed


def _dialogue(
    messages: list[dict[str, Any]], media_root: str | None, scratch: str, max_bytes: int, files: list[str]
) -> tuple[list[tuple[str, str | None]], dict[str, list[str]]]:
    """(question, answer) pairs (the last unanswered) and the media files of the user messages."""
    said: list[tuple[str, str]] = []
    inputs: dict[str, list[str]] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise InputError(f"messages[{i}].role: {role!r}; expected system, user or assistant")
        expected = "user" if not said or said[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise InputError(
                f"messages[{i}].role: {role!r} where a {expected} message is expected (they alternate, "
                "from a user message, and end with one)"
            )
        text = content_parts(
            message.get("content"), f"messages[{i}].content", role, media_root, scratch, max_bytes, files, inputs
        )
        said.append((role, text))
    if not said or said[-1][0] != "user":
        raise InputError("messages: the last message must be the user's question")
    texts = [t for _, t in said]
    return [(q, a) for q, a in zip(texts[::2], texts[1::2], strict=False)] + [(texts[-1], None)], inputs


def content_parts(
    content: Any,
    where: str,
    role: str,
    media_root: str | None,
    scratch: str,
    max_bytes: int,
    files: list[str],
    inputs: dict[str, list[str]],
) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where}: a string or a list of content parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        here = f"{where}[{j}]"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InputError(f"{here}.text: a string is expected")
            texts.append(part["text"])
            continue
        if kind not in PARTS:
            raise InputError(f"{here}.type: unknown content part type {kind!r}; known: text, {', '.join(PARTS)}")
        if role != "user":
            raise InputError(f"{here}: media parts belong in user messages")
        modality, key, mimes = PARTS[kind]
        path = _media(part.get(key), kind, f"{here}.{key}", mimes, media_root, scratch, max_bytes, files)
        inputs.setdefault(modality, []).append(path)
    return "\n".join(texts)


def _media(
    ref: Any,
    kind: str,
    where: str,
    mimes: tuple[str, ...],
    media_root: str | None,
    scratch: str,
    max_bytes: int,
    files: list[str],
) -> str:
    """A local file holding the part's media: a data: URL written to `scratch`, or a path under `media_root`."""
    if kind in INLINE:  # OpenAI's audio part, and ours for point clouds: {"data": base64, "format": ...}
        default, formats = INLINE[kind]
        if not isinstance(ref, dict) or not isinstance(ref.get("data"), str):
            raise InputError(f"{where}: expected {{'data': base64, 'format': '{default}'}}")
        suffix = formats.get(str(ref.get("format", default)).lower())
        if suffix is None:
            raise InputError(f"{where}.format: {ref.get('format')!r}; known: {', '.join(formats)}")
        return _write(_b64(ref["data"], where, max_bytes), suffix, scratch, files)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise InputError(f"{where}.url: a data: URL or a path under the server's media root is expected")
    if url.startswith("data:") and not mimes:
        raise InputError(
            f"{where}.url: a {kind} part names a file under the server's media root; send the data "
            "itself as a point_cloud part {'data': base64, 'format': 'ply'}"
        )
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        mime = header.split(";")[0].lower()
        if not sep or ";base64" not in header:
            raise InputError(f"{where}.url: a data: URL must be base64 (data:<type>;base64,<data>)")
        if not mime.startswith(mimes):
            raise InputError(f"{where}.url: media type {mime or 'none'!r} in a {kind} part; expected {mimes[0]}*")
        return _write(_b64(payload, where, max_bytes), SUFFIXES.get(mime, ""), scratch, files)
    if "://" in url and not url.startswith("file://"):
        raise InputError(f"{where}.url: the server fetches nothing: send the media as a data: URL")
    return _under_root(url.removeprefix("file://"), where, media_root)


def _b64(data: str, where: str, max_bytes: int) -> bytes:
    if len(data) * 3 // 4 > max_bytes:
        raise InputError(f"{where}: media of about {len(data) * 3 // 4:,} bytes, above the limit of {max_bytes:,}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: not valid base64 ({e})") from None


def _write(data: bytes, suffix: str, scratch: str, files: list[str]) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix, dir=scratch)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    files.append(path)
    return path


def _under_root(path: str, where: str, media_root: str | None) -> str:
    """The real path of a server-side file, refused unless it lies under the media root (links resolved first)."""
    if media_root is None:
        raise RefusedPath(f"{where}: server-side paths are off (serve.media_root is not set): send a data: URL")
    root = os.path.realpath(media_root)
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise RefusedPath(f"{where}: {path!r} is outside the server's media root")
    return real


def completion(answer: str, model: str, prompt_tokens: int, completion_tokens: int, finish: str) -> dict[str, Any]:
    """A chat.completion response."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk(ident: str, model: str, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    """One chat.completion.chunk of a stream."""
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
