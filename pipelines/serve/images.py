"""POST /v1/images/generations: images drawn from the chat API's media parts, answered as base64 PNGs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.apps.unclip import Drawing
from model.errors import ModelInputError
from pipelines.apps.imagine import Imaginer
from pipelines.apps.output import png_bytes
from pipelines.errors import InputError
from pipelines.runtime.inputs import Request as Inputs
from pipelines.runtime.inputs import check_weight
from pipelines.serve.app import Limits, error
from pipelines.serve.chat_format import RefusedPath, content_parts


class ImagesBody(BaseModel):
    """The images request: `input` holds the chat API's content parts (media, and text for ImageBind's text tower);
    `prompt` is unCLIP's own text prompt; the rest default to the server's imagine settings."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[dict[str, Any]] = Field(min_length=1)
    prompt: str | None = None
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0)
    noise_level: int | None = Field(None, ge=0, le=999)
    cache: bool | None = None
    weights: dict[str, float] = {}
    response_format: str = Field("b64_json", pattern="^b64_json$")


def parse_images_body(
    doc: Any, media_root: str | None, scratch: str, max_bytes: int
) -> tuple[ImagesBody, Inputs, list[str]]:
    """The body, its inputs as a Request, and the files its data: URLs were written to (the caller removes them)."""
    try:
        body = ImagesBody.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in e.errors())
        raise InputError(problems) from None
    files: list[str] = []
    inputs: dict[str, list[str]] = {}
    try:
        text = content_parts(body.input, "input", "user", media_root, scratch, max_bytes, files, inputs)
        if text.strip():
            inputs["text"] = [text]
        for modality, weight in body.weights.items():
            check_weight(modality, weight)
            if modality not in inputs:
                raise InputError(f"weights: {modality} given, but the input has no such part")
        return body, Inputs(weights=body.weights, prompt=body.prompt, seed=body.seed, **inputs), files
    except BaseException:
        _remove(files)
        raise


def _remove(files: list[str]) -> None:
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def add_image_routes(app: FastAPI, imaginer: Imaginer, scratch: str, limits: Limits) -> None:
    """Serve POST /v1/images/generations on `app`; one drawing at a time (the generator is not shared)."""
    lock = threading.Lock()
    s = imaginer.cfg.imagine

    def draw(body: ImagesBody, req: Inputs) -> list[dict[str, Any]]:
        with lock:
            seed = imaginer.cfg.seed if req.seed is None else req.seed
            drawing = Drawing(imaginer.embedding(req, body.cache), seed, req.prompt or "")
            guidance = s.guidance if body.guidance_scale is None else body.guidance_scale
            noise = s.noise_level if body.noise_level is None else body.noise_level
            images = imaginer.unclip.draw([drawing], body.n, body.steps or s.steps, guidance, noise, s.size)[0]
        return [{"b64_json": base64.b64encode(png_bytes(im)).decode(), "seed": seed + i} for i, im in enumerate(images)]

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            return error(413, f"body of {len(raw):,} bytes, above the limit of {limits.max_body_bytes:,}")
        try:
            body, req, files = parse_images_body(json.loads(raw), limits.media_root, scratch, limits.max_media_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"body: not JSON ({e})")
        except RefusedPath as e:
            return error(403, str(e))
        except InputError as e:
            return error(400, str(e))
        try:
            data = await asyncio.to_thread(draw, body, req)
        except (InputError, ModelInputError) as e:
            return error(400, str(e))
        finally:
            _remove(files)
        return JSONResponse({"created": int(time.time()), "data": data, "embedding_norm": imaginer.unclip.norm})
