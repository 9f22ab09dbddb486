"""`ibllm serve`: the model behind the HTTP API and the chat page, on uvicorn in this process."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from pipelines import stop
from pipelines.apps.ground import Grounder, GroundOptions
from pipelines.config import Config
from pipelines.runtime import loader
from pipelines.serve.app import Limits, create_app
from pipelines.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class Served:
    """A built app, its scheduler (the engine's thread), the checkpoint it answers with, and its scratch folder."""

    app: FastAPI
    scheduler: Scheduler
    checkpoint: str
    scratch: tempfile.TemporaryDirectory

    def close(self) -> None:
        self.scheduler.close()
        self.scratch.cleanup()


def limits_of(cfg: Config) -> Limits:
    s = cfg.serve
    root = os.path.abspath(s.media_root) if s.media_root else None
    return Limits(
        max_body_bytes=int(s.max_body_mb * 2**20),
        max_media_bytes=int(s.max_media_mb * 2**20),
        timeout_s=s.timeout_s,
        media_root=root,
    )


def build(cfg: Config) -> Served:
    """Load the model of `infer.*` through the runtime (with the encoder, and the cache when `infer.use_cache`) and
    build the app over its scheduler; grounding and any-to-image beside it when a detector or generator is set."""
    loaded = loader.load(cfg, need_encoder=True, slots=cfg.serve.slots)
    answerer = loaded.answerer
    scheduler = Scheduler(answerer, cfg.serve.max_queue)
    scratch = tempfile.TemporaryDirectory(prefix="ibllm-serve-")
    name = model_name(loaded.checkpoint, loaded.trained.made_by)
    grounder = Grounder(cfg, GroundOptions(), cfg.infer.device) if cfg.model.detector else None  # loaded on first use
    app = create_app(scheduler, name, scratch.name, limits_of(cfg), grounder)
    if cfg.imagine.generator:  # any-to-image beside the chat, on the same encoder and cache (the apps extra)
        from pipelines.apps import imagine
        from pipelines.serve.images import add_image_routes

        imaginer = imagine.with_encoder(cfg, answerer.encoder, answerer.cache)
        add_image_routes(app, imaginer, scratch.name, limits_of(cfg))
    return Served(app, scheduler, loaded.checkpoint, scratch)


def model_name(checkpoint: str, made_by: dict) -> str:
    """What /v1/models calls the checkpoint: `stage<N>/<run id>` from its metadata, else its folder's name."""
    if made_by.get("stage") is not None and made_by.get("run_id"):
        return f"stage{made_by['stage']}/{made_by['run_id']}"
    parts = [p for p in checkpoint.rstrip("/").split("/") if p and p != "model"]
    return parts[-1] if parts else checkpoint


class _StopServer(uvicorn.Server):
    """uvicorn, stopped by the command line's signal watcher (`pipelines.stop`) instead of its own handlers, which
    would raise the signal again once shut down (and the watcher would take it for a second Ctrl-C)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        def stop_when_asked() -> None:
            while not self.should_exit and not stop.wait(0.2):
                pass
            self.should_exit = True

        threading.Thread(target=stop_when_asked, name="ibllm-serve-stop", daemon=True).start()
        yield


def run(cfg: Config, sock: socket.socket | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM) on serve.host:serve.port, or on an already bound `sock`."""
    served = build(cfg)
    server = (_StopServer if stop.is_watched() else uvicorn.Server)(
        uvicorn.Config(
            served.app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", timeout_graceful_shutdown=5
        )
    )
    where = sock.getsockname() if sock else (cfg.serve.host, cfg.serve.port)
    log.info(
        "serving %s on http://%s:%d (the chat page at /, the API at /v1/chat/completions)",
        served.checkpoint,
        *where[:2],
    )
    try:
        server.run(sockets=[sock] if sock else None)
    finally:
        served.close()
