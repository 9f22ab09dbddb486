"""A threaded HTTP server on loopback that answers the synthetic source's URLs, good and bad."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from pipelines.config import Config, SyntheticConfig
from pipelines.demo import synthetic
from pipelines.demo import synthetic_media as media
from pipelines.demo.synthetic import Item, SyntheticSource
from pipelines.errors import InputError
from stores.workspace import Workspace

log = logging.getLogger(__name__)
HTML_PAGE = b"<!doctype html><html><body><h1>Not an image</h1><p>A page, not a picture.</p></body></html>"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("synthetic server: " + format, *args)

    def do_GET(self) -> None:
        srv = self.server
        path = urlsplit(self.path).path
        if path.startswith("/media/") and path[7:] in srv.media:
            ctype = "audio/wav" if path.endswith(".wav") else "video/mp4"
            return self._send(200, srv.media[path[7:]], ctype)
        item = srv.source.routes.get(path)
        if item is None or item.kind == "404":
            return self._send(404, b"not found", "text/plain")
        if item.kind == "500":
            return self._send(500, b"internal server error", "text/plain")
        if item.kind == "html":
            return self._send(200, HTML_PAGE, "text/html; charset=utf-8")
        if item.kind == "huge":
            return self._send(200, media.huge_png(), "image/png")
        if item.kind == "loop":
            other = "b" if path.endswith("/a") else "a"
            return self._send(302, b"", "text/plain", {"Location": f"{path[:-1]}{other}"})
        if item.kind == "slow" and srv.stopping.wait(srv.source.cfg.slow_seconds):
            return None  # shutting down
        data = srv.image(item)
        if item.kind == "truncated":
            return self._send(200, data[: len(data) * 3 // 5], "image/jpeg")
        headers = {"X-Robots-Tag": "noai"} if item.kind == "noai" else {}
        return self._send(200, data, "image/png" if item.fmt == "png" else "image/jpeg", headers)

    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): nothing to answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, source: SyntheticSource, media_files: dict[str, bytes], address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.source = source
        self.media = media_files
        self.stopping = threading.Event()
        self.image = functools.lru_cache(maxsize=512)(self._render)

    def _render(self, item: Item) -> bytes:
        return item.render(self.source.cfg.seed)


class SyntheticServer:
    """Serve the synthetic source on 127.0.0.1 (an ephemeral port unless the config names one).

    Use as a context manager: `with SyntheticServer(cfg) as srv: srv.base_url`.
    """

    def __init__(self, cfg: SyntheticConfig, preferred_port: int | None = None) -> None:
        host = "127.0.0.1" if cfg.host == "localhost" else cfg.host
        if not ipaddress.ip_address(host).is_loopback:  # the config refuses it too; never bind elsewhere
            raise ValueError(f"the synthetic server binds loopback addresses only, not {host!r}")
        self.source = SyntheticSource(cfg)
        self._address = (host, cfg.port)
        self._preferred = preferred_port if cfg.port == 0 else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT` once started."""
        if self._server is None:
            raise RuntimeError("the synthetic server is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SyntheticServer:
        """Bind and serve in a background thread."""
        media_files = {**self.source.audio(), **self.source.video()}
        if any(it.kind == "huge" for it in self.source.items):
            media.huge_png()  # built once up front (about a second), not inside a client's timeout
        try:  # the port of the last run keeps the metadata's URLs valid; any free port otherwise
            self._server = _Server(self.source, media_files, (self._address[0], self._preferred or self._address[1]))
        except OSError:
            if not self._preferred:
                raise
            log.info("port %d is taken; serving on a new one", self._preferred)
            self._server = _Server(self.source, media_files, self._address)
        self._thread = threading.Thread(target=self._server.serve_forever, name="synthetic-http", daemon=True)
        self._thread.start()
        log.info("synthetic source served at %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is not None:
            self._server.stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SyntheticServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def server_for(cfg: Config) -> SyntheticServer:
    """A (not yet started) server for the config's synthetic source, on the port its metadata was written for."""
    written = synthetic.written_base_url(Workspace(cfg.workspace, cfg.storage_options))
    return SyntheticServer(cfg.synthetic, preferred_port=urlsplit(written).port if written else None)


@contextlib.contextmanager
def serving(cfg: Config) -> Iterator[SyntheticServer | None]:
    """Serve the synthetic source while later stages fetch it, when the config has one (else do nothing).

    The server takes the port the source's metadata was written for; if that port is taken the URLs would be
    wrong, so this refuses and asks for `ibllm synthetic` to write the source again.
    """
    if not any(s.format == "synthetic" for s in cfg.sources):
        yield None
        return
    written = synthetic.written_base_url(Workspace(cfg.workspace, cfg.storage_options))
    with server_for(cfg) as server:
        if written and server.base_url != written:
            raise InputError(
                f"the synthetic source was written for {written}, which is no longer free; "
                "run `ibllm synthetic` to write it for a new address"
            )
        yield server
