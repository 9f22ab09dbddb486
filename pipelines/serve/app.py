"""The HTTP app: OpenAI-style chat completions (streamed or whole), models, health, metrics and the chat page."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from pipelines.apps.ground import NO_DETECTOR, Grounder
from pipelines.errors import InputError
from pipelines.serve.chat_format import Parsed, RefusedPath, chunk, completion, parse_body
from pipelines.serve.scheduler import QueueFull, Scheduler, Ticket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = 32 * 2**20
    max_media_bytes: int = 16 * 2**20
    timeout_s: float = 300.0
    media_root: str | None = None


def error(status: int, message: str) -> JSONResponse:
    """An OpenAI-style error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class _Pending:
    """A ticket's events moved from the engine's thread onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.events = loop, asyncio.Queue()

    def put(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def create_app(
    scheduler: Scheduler, model_name: str, scratch: str, limits: Limits = Limits(), grounder: Grounder | None = None
) -> FastAPI:
    """The app over a running scheduler; data: URL media are written under `scratch` and removed after use; a
    request with `ground` has its answer grounded by `grounder` (model.detector)."""
    app = FastAPI(title="ibllm", version="1")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "held": scheduler.held}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "ibllm"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        engine = scheduler.answerer.engine
        lines = ["# HELP ibllm_requests_total Chat requests by outcome.", "# TYPE ibllm_requests_total counter"]
        for outcome in ("ok", "error", "rejected", "cancelled", "timeout"):
            lines.append(f'ibllm_requests_total{{outcome="{outcome}"}} {scheduler.requests[outcome]}')
        gauges = {
            "ibllm_tokens_total": ("counter", "Tokens generated.", scheduler.tokens_total),
            "ibllm_queue_length": ("gauge", "Requests waiting for a decoding slot.", engine.waiting),
            "ibllm_active_requests": ("gauge", "Requests decoding.", engine.active),
            "ibllm_held_requests": ("gauge", "Requests accepted and not finished.", scheduler.held),
            "ibllm_tokens_per_second": ("gauge", "Tokens/s over the last 10 s.", scheduler.tokens_per_second()),
        }
        for name, (kind, text, value) in gauges.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("pipelines.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return error(413, f"body of {int(declared):,} bytes, above the limit of {limits.max_body_bytes:,}")
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            return error(413, f"body of {len(raw):,} bytes, above the limit of {limits.max_body_bytes:,}")
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"body: not JSON ({e})")
        try:
            parsed = parse_body(doc, limits.media_root, scratch, limits.max_media_bytes)  # only small local writes
        except RefusedPath as e:
            return error(403, str(e))
        except InputError as e:
            return error(400, str(e))
        if parsed.ground is not None and grounder is None:
            parsed.cleanup()
            return error(400, f"ground: {NO_DETECTOR}")
        pending = _Pending(asyncio.get_running_loop())
        stream = (lambda text: pending.put("text", text)) if parsed.stream else None  # whole answers: no per-token
        ticket = Ticket(
            parsed.request,
            parsed.cache,
            on_text=stream,
            on_done=lambda finish, e: pending.put("done", finish, e),
            on_start=lambda: pending.put("start"),
        )
        try:
            scheduler.submit(ticket)
        except QueueFull as e:
            parsed.cleanup()
            return error(429, str(e))
        try:
            async with asyncio.timeout(limits.timeout_s):
                first = await pending.events.get()
        except TimeoutError:
            return _timed_out(scheduler, ticket, parsed, limits)
        if first[0] == "done":  # refused while being prepared
            parsed.cleanup()
            return _failure(first[2])
        if parsed.stream:
            return StreamingResponse(
                _stream(scheduler, ticket, parsed, pending, model_name, limits), media_type="text/event-stream"
            )
        return await _whole(scheduler, ticket, parsed, pending, model_name, limits, grounder)

    return app


def _failure(e: Exception | None) -> JSONResponse:
    if isinstance(e, InputError):
        return error(400, str(e))
    return error(500, f"generation failed: {type(e).__name__}: {e}")


def _timed_out(scheduler: Scheduler, ticket: Ticket, parsed: Parsed, limits: Limits) -> JSONResponse:
    scheduler.cancel(ticket, "timeout")
    parsed.cleanup()
    return error(504, f"no answer within serve.timeout_s ({limits.timeout_s:g} s)")


async def _whole(
    scheduler: Scheduler,
    ticket: Ticket,
    parsed: Parsed,
    pending: _Pending,
    model: str,
    limits: Limits,
    grounder: Grounder | None = None,
) -> JSONResponse:
    try:
        while True:
            async with asyncio.timeout(limits.timeout_s):
                event = await pending.events.get()
            if event[0] == "done":
                if event[2] is not None:
                    return _failure(event[2])
                answer = scheduler.answerer.tokenizer.decode(ticket.tokens).strip()
                doc = completion(answer, model, ticket.prompt_tokens, len(ticket.tokens), event[1])
                if grounder is not None and parsed.ground is not None:  # before cleanup: data: URL images
                    try:
                        found = await asyncio.to_thread(
                            grounder.ground, answer, parsed.request.image, None, parsed.ground
                        )
                    except InputError as e:
                        return error(400, str(e))
                    doc["grounding"] = found.model_dump(exclude_none=True)
                return JSONResponse(doc)
    except TimeoutError:
        log.warning("a request timed out after %d tokens", len(ticket.tokens))
        return _timed_out(scheduler, ticket, parsed, limits)
    finally:
        parsed.cleanup()


async def _stream(
    scheduler: Scheduler, ticket: Ticket, parsed: Parsed, pending: _Pending, model: str, limits: Limits
) -> AsyncIterator[str]:
    """Server-sent events: the role, then each new piece of text, then the finish reason and [DONE]."""
    ident = f"chatcmpl-{id(ticket):x}"
    sent, finished = "", False
    try:
        yield _sse(chunk(ident, model, {"role": "assistant", "content": ""}))
        while True:
            async with asyncio.timeout(limits.timeout_s):
                event = await pending.events.get()
            if event[0] == "text":
                text = event[1].lstrip()  # the answer is stripped, as generate's
                piece = text[len(sent) :] if text.startswith(sent) else ""
                if piece:
                    sent += piece
                    yield _sse(chunk(ident, model, {"content": piece}))
            elif event[0] == "done":
                finished = True
                if event[2] is not None:
                    yield _sse({"error": {"message": str(event[2]), "type": "server_error", "code": 500}})
                else:
                    yield _sse(chunk(ident, model, {}, event[1]))
                yield "data: [DONE]\n\n"
                return
    except TimeoutError:
        yield _sse(
            {
                "error": {
                    "message": f"no answer within serve.timeout_s ({limits.timeout_s:g} s)",
                    "type": "server_error",
                    "code": 504,
                }
            }
        )
    finally:
        if not finished:  # a client gone, or a timeout: free the slot
            scheduler.cancel(ticket)
        parsed.cleanup()


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc)}\n\n"
