"""A loopback server of hostile image URLs for the download tests: odd formats, lying metadata, drips, flaky hosts."""

from __future__ import annotations

import io
import struct
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
DRIP_SECONDS = 0.25  # between two bytes of a drip: below every per-read timeout of the tests


@dataclass(frozen=True)
class Case:
    """One URL: what the server answers and what the download must make of it.

    Attributes:
        name: the URL path is `/case/<name>`.
        body: the bytes of the answer (None for the drips and errors).
        reason: the final reason the catalog must give after the retry round.
        size: the real (width, height) of the picture, upright; None when it is not kept.
        color: the picture's mean colour; for a two-coloured picture, its first half (top, or left when wide).
        second: the other half's colour of a two-coloured picture.
        status: the HTTP status.
        mode: how it is served: plain, drip_body, drip_headers, flaky (503 first, then the image), private (a
            redirect to 127.0.0.2, which the download must refuse), or a path to redirect to.
        ctype: the Content-Type.
        headers: more response headers.
        first_reason: the reason of the first attempt, when the retry round changes it.
        scheme: the scheme of the case's URL as written in the metadata (in any case: `HTTP` is http).
    """

    name: str
    reason: str
    body: bytes = b""
    size: tuple[int, int] | None = None
    color: RGB | None = None
    second: RGB | None = None
    status: int = 200
    mode: str = "plain"
    ctype: str = "image/jpeg"
    headers: tuple[tuple[str, str], ...] = ()
    first_reason: str | None = None
    scheme: str = "http"


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def halves(size: tuple[int, int], first: RGB, second: RGB, vertical: bool) -> Image.Image:
    """A picture whose left (or top, when `vertical`) half is `first` and the other half `second`."""
    img = Image.new("RGB", size, first)
    w, h = size
    img.paste(second, (0, h // 2, w, h) if vertical else (w // 2, 0, w, h))
    return img


def exif_jpeg(raw: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(raw, "JPEG", quality=95, exif=exif.tobytes())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces a huge size and holds no pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def cases(seed: int) -> list[Case]:
    """The hostile URLs, colours and sizes drawn from `seed`."""
    rng = np.random.default_rng(seed)

    def color() -> RGB:
        return tuple(int(v) for v in rng.integers(30, 226, 3))  # type: ignore[return-value]

    def side(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi))

    c = [color() for _ in range(12)]
    w, h = side(90, 140), side(60, 89)
    grey16 = int(rng.integers(3_000, 60_000))
    rgb16 = rng.integers(3_000, 60_000, 3)
    cmyk = (*(int(v) for v in rng.integers(0, 120, 3)), 0)
    gif = [Image.new("RGB", (w, h), c[2]), Image.new("RGB", (w, h), c[3])]
    webp = [Image.new("RGB", (h, w), c[4]), Image.new("RGB", (h, w), c[5])]
    rgba = Image.new("RGBA", (w, h), (*c[6], 0))  # fully transparent: the decoder drops alpha, as `.convert` does
    palette = Image.new("RGB", (w, h), c[7]).quantize(4)
    big = side(700, 900)
    flaky = encode(Image.new("RGB", (w, h), c[11]), "JPEG", quality=95)
    return [
        Case("jpeg", "success", encode(Image.new("RGB", (w, h), c[0]), "JPEG", quality=95), (w, h), c[0]),
        Case("big_jpeg", "success", encode(Image.new("RGB", (big, 600), c[1]), "JPEG", quality=90), (big, 600), c[1]),
        Case(
            "animated_gif",
            "success",
            encode(gif[0], "GIF", save_all=True, append_images=gif[1:], duration=80, loop=0),
            (w, h),
            c[2],
            ctype="image/gif",
        ),
        Case(
            "animated_webp",
            "success",
            encode(webp[0], "WEBP", save_all=True, append_images=webp[1:], duration=80, lossless=True),
            (h, w),
            c[4],
            ctype="image/webp",
        ),
        Case("exif_6", "success", exif_jpeg(halves((w, h), c[8], c[9], vertical=False), 6), (h, w), c[8], c[9]),
        Case("exif_8", "success", exif_jpeg(halves((w, h), c[8], c[9], vertical=False), 8), (h, w), c[9], c[8]),
        Case("exif_3", "success", exif_jpeg(halves((w, h), c[9], c[10], vertical=False), 3), (w, h), c[10], c[9]),
        Case(
            "png16_grey",
            "success",
            encode(Image.fromarray(np.full((h, w), grey16, np.uint16)), "PNG"),
            (w, h),
            (round(grey16 * 255 / 65535),) * 3,
            ctype="image/png",
        ),
        Case(
            "png16_rgb",
            "success",
            cv2.imencode(".png", np.full((h, w, 3), rgb16[::-1], np.uint16))[1].tobytes(),
            (w, h),
            tuple(round(int(v) / 257) for v in rgb16),
            ctype="image/png",
        ),
        Case(
            "cmyk_jpeg",
            "success",
            encode(Image.new("CMYK", (w, h), cmyk), "JPEG", quality=95),
            (w, h),
            tuple(255 - v for v in cmyk[:3]),
        ),
        Case("rgba_png", "success", encode(rgba, "PNG"), (w, h), c[6], ctype="image/png"),
        Case(
            "palette_png",
            "success",
            encode(palette, "PNG"),
            (w, h),
            palette.convert("RGB").getpixel((0, 0)),
            ctype="image/png",
        ),
        Case("wide", "aspect_ratio", encode(Image.new("RGB", (side(2000, 4000), 30), c[0]), "PNG"), ctype="image/png"),
        Case("tiny", "too_small", encode(Image.new("RGB", (side(12, 20), side(12, 20)), c[1]), "PNG")),
        Case("narrow", "too_small", encode(Image.new("RGB", (side(30, 39), 70), c[1]), "JPEG")),
        Case("bomb", "too_large", png_header_only(side(30_000, 40_000), 30_000), ctype="image/png"),
        Case("truncated_png", "decode", encode(Image.new("RGB", (w, h), c[2]), "PNG")[:60], ctype="image/png"),
        Case("html", "decode", b"<!doctype html><p>not an image</p>", ctype="text/html"),
        Case("missing", "http_404", b"gone", status=404, ctype="text/plain"),
        Case("moved", "success", size=(w, h), color=c[0], mode="/case/jpeg"),
        Case("noai", "opt_out", flaky, headers=(("X-Robots-Tag", "noimageai"),)),
        Case("drip_body", "timeout", flaky, mode="drip_body"),
        Case("drip_headers", "timeout", flaky, mode="drip_headers"),
        Case("flaky", "success", flaky, (w, h), c[11], mode="flaky", first_reason="http_503"),
        Case(
            "upper_scheme",
            "success",
            encode(Image.new("RGB", (h, w), c[5]), "JPEG", quality=95),
            (h, w),
            c[5],
            scheme="HTTP",
        ),
        Case("to_private", "blocked_address", mode="private"),
    ]


class _Handler(BaseHTTPRequestHandler):
    server: HostileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/redirect?to="):  # to any URL: a redirect to another host, port or scheme
            target = urllib.parse.unquote(self.path.removeprefix("/redirect?to="))
            return self._answer(302, b"", "text/plain", headers=(("Location", target),))
        if self.path == "/endless":  # no length, no end: only a byte limit (or the deadline) stops the reader
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            while self._write(b"\xff" * 65536) and not self.server.stopping.is_set():
                pass
            return None
        case = self.server.routes.get(self.path)
        if case is None:
            return self._answer(404, b"", "text/plain")
        with self.server.lock:
            self.server.requests[case.name] += 1
            first = self.server.requests[case.name] == 1
        if case.mode == "flaky" and first:
            return self._answer(503, b"busy", "text/plain")
        if case.mode == "private":  # the same port on another loopback address
            target = f"http://127.0.0.2:{self.server.server_address[1]}/case/jpeg"
            return self._answer(302, b"", "text/plain", headers=(("Location", target),))
        if case.mode.startswith("/"):
            return self._answer(302, b"", "text/plain", headers=(("Location", case.mode),))
        if case.mode == "drip_headers":
            return self._drip(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Slow: " + b"x" * 400 + b"\r\n\r\n")
        if case.mode == "drip_body":
            self._answer(200, None, case.ctype, length=len(case.body))
            return self._drip(case.body)
        return self._answer(case.status, case.body, case.ctype, headers=case.headers)

    def _answer(
        self, status: int, body: bytes | None, ctype: str, length: int = 0, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if body is not None else length))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if body is not None:
            self._write(body)

    def _drip(self, data: bytes) -> None:
        start = time.monotonic()
        for i in range(len(data)):
            if not self._write(data[i : i + 1]) or self.server.stopping.wait(DRIP_SECONDS):
                break
        with self.server.lock:
            self.server.drips.append(time.monotonic() - start)

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client hung up (a deadline or a timeout)
            return False


class HostileServer(ThreadingHTTPServer):
    """Serve `cases(seed)` on `host` (a loopback address) as a context manager; counts the requests per case and
    times the drips."""

    daemon_threads = True
    request_queue_size = 128  # many clients connect at once: a full backlog would drop SYNs for a second

    def __init__(self, seed: int, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.cases = cases(seed)
        self.routes = {f"/case/{c.name}": c for c in self.cases}
        self.requests: Counter[str] = Counter()
        self.drips: list[float] = []  # seconds each drip went on before the client hung up
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        host, port = self.server_address[:2]
        case = self.routes.get(f"/case/{name}")
        return f"{case.scheme if case else 'http'}://{host}:{port}/case/{name}"

    def redirect(self, target: str) -> str:
        """A URL of this server that redirects to `target`."""
        return self.url("").replace("/case/", "/redirect?to=" + urllib.parse.quote(target, safe=""))

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


def stored_size(size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """Where an upright (width, height) ends: larger pictures shrink to `image_size` on the short side."""
    w, h = size
    if min(w, h) <= image_size:
        return w, h
    return (image_size, int(image_size * h / w)) if w <= h else (int(image_size * w / h), image_size)


def check_picture(img: Image.Image, case: Case, image_size: int, tolerance: float = 8.0) -> None:
    """The stored picture of a case: its size, its mean colour, and for two colours which half is where."""
    assert case.size is not None and case.color is not None
    assert img.size == stored_size(case.size, image_size), (case.name, img.size)
    pixels = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    if case.second is None:
        parts = [(pixels, case.color)]
    else:
        h, w = pixels.shape[:2]
        tall = h >= w  # an upright picture of halves is split along its long side
        first, second = (pixels[: h // 3], pixels[-h // 3 :]) if tall else (pixels[:, : w // 3], pixels[:, -w // 3 :])
        parts = [(first, case.color), (second, case.second)]
    for part, want in parts:
        mean = part.reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - np.array(want)).max() <= tolerance, (case.name, mean.round(1).tolist(), want)
