"""Deterministic media of the synthetic source: shape images, a bomb PNG, WAV tones, a video, a 3D point cloud."""

from __future__ import annotations

import functools
import io
import math
import re
import struct
import wave
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# neutral backgrounds: the shape's colour is the one colour word of a caption, so a tiny language model can learn it
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "light grey": (200, 200, 195),
    "dark grey": (70, 70, 75),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring")
HUGE_SIZE = (14_000, 13_000)  # 182M pixels: above PIL's decompression-bomb error limit (2 x 89.5M)


SIZES = ("large", "small")
SCALES = {"large": 0.7, "small": 0.35}  # the shape's size against the picture's, per size word
_CAPTION = re.compile(r"^a (large|small) (\w+) (\w+) on a ([\w ]+) background$")


@dataclass(frozen=True)
class Scene:
    """What a synthetic picture shows."""

    size: str
    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background"


def parse_caption(caption: str) -> Scene | None:
    """The scene a synthetic caption describes, or None for any other text."""
    m = _CAPTION.match(caption.strip())
    if not m or m.group(2) not in COLORS or m.group(3) not in SHAPES:
        return None
    return Scene(m.group(1), m.group(2), m.group(3), m.group(4))


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn uniformly from the vocabulary."""
    return Scene(
        str(rng.choice(SIZES)),
        str(rng.choice(list(COLORS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(BACKGROUNDS))),
    )


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
    elif shape == "diamond":
        angles = [-90, 0, 90, 180]
    else:  # star: 10 points alternating outer and inner radius
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]


def draw_shape(size: tuple[int, int], shape: str, color: str, background: str, scale: float, seed: int) -> Image.Image:
    """A `shape` in `color` on a `background` (BACKGROUNDS or COLORS) of `size` (w, h); `scale`: of the short side."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, BACKGROUNDS.get(background) or COLORS[background])
    draw = ImageDraw.Draw(img)
    r = scale * min(w, h) / 2
    cx = w / 2 + rng.uniform(-0.15, 0.15) * (w - 2 * r)
    cy = h / 2 + rng.uniform(-0.15, 0.15) * (h - 2 * r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r * 0.3)))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)
    noise = rng.integers(-10, 11, (h, w, 3), dtype=np.int16)  # a little sensor noise, so JPEG works as on photos
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """JPEG (quality 90) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90)
    elif fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected 'jpg' or 'png'")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def huge_png() -> bytes:
    """A valid grey PNG of HUGE_SIZE pixels (~180 KB on the wire, 182 MB decoded), built without decoding it."""
    w, h = HUGE_SIZE
    comp = zlib.compressobj(9)
    rows_per_chunk = 256
    block = (b"\x00" + b"\x80" * w) * rows_per_chunk  # filter byte 0 + mid-grey pixels
    parts = [comp.compress(block) for _ in range(h // rows_per_chunk)]
    parts.append(comp.compress((b"\x00" + b"\x80" * w) * (h % rows_per_chunk)))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def tone_wav(seconds: float, rate: int, channels: int, freq: float, chirp: bool = False) -> bytes:
    """A 16-bit PCM WAV of a tone (or a rising chirp) with soft edges."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (freq * t + (freq * t * t / seconds if chirp else 0))
    env = np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    mono = 0.5 * np.sin(phase) * env
    pcm = (np.repeat(mono[:, None], channels, axis=1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def moving_shape_mp4(seconds: float, fps: int = 10, size: tuple[int, int] = (160, 128)) -> bytes:
    """An MPEG-4 Part 2 video in MP4 of a red circle crossing a blue background left to right."""
    import av  # imported here: only this function needs the ffmpeg libraries

    w, h = size
    frames = max(2, round(seconds * fps))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            img = Image.new("RGB", size, COLORS["blue"])
            x = 10 + (w - 60) * i / (frames - 1)
            ImageDraw.Draw(img).ellipse((x, h / 2 - 20, x + 40, h / 2 + 20), fill=COLORS["red"])
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def cube_ply(points: int, seed: int) -> bytes:
    """A binary little-endian PLY of `points` points on the surface of a unit cube (centred, in the unit sphere after
    Point-Bind's normalisation), with normals: a point cloud like a scanned object's."""
    rng = np.random.default_rng(seed)
    face = rng.integers(0, 6, points)
    xyz = rng.uniform(-0.5, 0.5, (points, 3)).astype(np.float32)
    axis, sign = face // 2, np.where(face % 2, 0.5, -0.5).astype(np.float32)
    xyz[np.arange(points), axis] = sign
    normals = np.zeros_like(xyz)
    normals[np.arange(points), axis] = np.sign(sign)
    properties = "".join(f"property float {p}\n" for p in ("x", "y", "z", "nx", "ny", "nz"))
    header = f"ply\nformat binary_little_endian 1.0\nelement vertex {points}\n{properties}end_header\n"
    return header.encode("ascii") + np.concatenate([xyz, normals], axis=1).astype("<f4").tobytes()
