"""The synthetic source: seeded shape images with captions, LAION-style metadata, bad entries, audio and video."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from pipelines.config import Config, SyntheticConfig
from pipelines.demo import synthetic_media as media
from pipelines.demo.probe import probe
from stores.ledger import Ledger
from stores.workspace import Workspace

Kind = Literal["good", "404", "500", "slow", "truncated", "html", "huge", "loop", "noai", "duplicate"]
BAD_KINDS: tuple[Kind, ...] = ("404", "500", "slow", "truncated", "html", "huge", "loop", "noai", "duplicate")
_ROUTE = {
    "good": "img",
    "404": "missing",
    "500": "error",
    "slow": "slow",
    "truncated": "truncated",
    "html": "html",
    "huge": "huge",
    "loop": "loop",
    "noai": "noai",
}
_ASPECTS = (1.0, 1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 4.0)  # 4:1 is there for the aspect-ratio filter
_LANGUAGES = ("en",) * 9 + ("de", "fr", "es")
PHOTO = "photo.jpg"  # a large red circle on grey, in synthetic/media/ (the README asks about it)
CLOUD = "object.ply"  # a 3D point cloud (a cube's surface) in synthetic/media/, for the point-cloud input
# LAION's column names, in its capitalisation.
METADATA_SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("similarity", pa.float64()),
        ("WIDTH", pa.int64()),
        ("HEIGHT", pa.int64()),
        ("punsafe", pa.float64()),
        ("pwatermark", pa.float64()),
        ("LANGUAGE", pa.string()),
        ("kind", pa.string()),
    ]
)


@dataclass(frozen=True)
class Item:
    """One metadata row of the synthetic source and what the server does for its URL."""

    index: int
    kind: Kind
    shape: str
    color: str
    background: str
    large: bool
    width: int
    height: int
    fmt: Literal["jpg", "png"]
    similarity: float
    punsafe: float
    pwatermark: float
    language: str
    duplicate_of: int | None = None

    @property
    def caption(self) -> str:
        """What the picture shows, in words."""
        return media.Scene("large" if self.large else "small", self.color, self.shape, self.background).caption

    @property
    def url_path(self) -> str:
        """The path the server answers for this row (a duplicate points at its original's path)."""
        if self.kind == "duplicate":
            return f"/img/{self.duplicate_of:06d}.{self.fmt}"
        if self.kind == "loop":
            return f"/loop/{self.index:06d}/a"
        ext = "png" if self.kind == "huge" else self.fmt
        return f"/{_ROUTE[self.kind]}/{self.index:06d}.{ext}"

    def render(self, seed: int) -> bytes:
        """The encoded image of this row (deterministic)."""
        img = media.draw_shape(
            (self.width, self.height),
            self.shape,
            self.color,
            self.background,
            media.SCALES["large" if self.large else "small"],
            seed * 1_000_003 + self.index,
        )
        return media.encode_image(img, self.fmt)


class SyntheticSource:
    """Every row of the synthetic source, derived from the config alone."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg

    @cached_property
    def items(self) -> list[Item]:
        """The rows, in order; bad kinds take turns over seeded positions."""
        cfg, n = self.cfg, self.cfg.count
        rng = np.random.default_rng(cfg.seed)
        n_bad = round(n * cfg.bad_fraction)
        bad_at = {int(p): BAD_KINDS[i % len(BAD_KINDS)] for i, p in enumerate(rng.permutation(n)[:n_bad])}
        colors, shades = list(media.COLORS), list(media.BACKGROUNDS)
        items: list[Item] = []
        for i in range(n):
            color, shade = rng.choice(len(colors), size=2, replace=False)  # one draw, as before backgrounds were grey
            short = int(rng.integers(cfg.min_side, cfg.max_side + 1))
            aspect = float(rng.choice(_ASPECTS))
            w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
            kind: Kind = bad_at.get(i, "good")
            goods = [it.index for it in items if it.kind == "good"]
            if kind == "duplicate" and not goods:
                kind = "404"  # nothing to duplicate yet
            item = Item(
                index=i,
                kind=kind,
                shape=str(rng.choice(media.SHAPES)),
                color=colors[color],
                background=shades[shade % len(shades)],
                large=bool(rng.random() < 0.5),
                width=w,
                height=h,
                fmt="png" if rng.random() < cfg.png_fraction else "jpg",
                similarity=round(float(np.clip(rng.normal(0.31, 0.035), 0.15, 0.45)), 4),
                punsafe=round(float(rng.beta(0.5, 20)), 4),
                pwatermark=round(float(rng.beta(0.8, 5)), 4),
                language=str(rng.choice(_LANGUAGES)),
            )
            if kind == "duplicate":
                item = _duplicate(item, items[int(rng.choice(goods))])
            elif kind == "huge":
                item = _replace(item, width=media.HUGE_SIZE[0], height=media.HUGE_SIZE[1], fmt="png")
            elif kind == "truncated":
                item = _replace(item, fmt="jpg")
            items.append(item)
        return items

    @cached_property
    def routes(self) -> dict[str, Item]:
        """URL path -> row (duplicates share their original's path)."""
        out: dict[str, Item] = {}
        for it in self.items:
            if it.kind == "duplicate":
                continue
            out[it.url_path] = it
            if it.kind == "loop":
                out[f"/loop/{it.index:06d}/b"] = it
        return out

    def audio(self) -> dict[str, bytes]:
        """Short WAV clips: 16 kHz mono, 44.1 kHz stereo, 48 kHz mono chirp, in turn."""
        variants = ((16_000, 1, False), (44_100, 2, False), (48_000, 1, True))
        out = {}
        for i in range(self.cfg.audio_clips):
            rate, channels, chirp = variants[i % len(variants)]
            out[f"audio_{i:02d}.wav"] = media.tone_wav(self.cfg.audio_seconds, rate, channels, 220.0 * (i + 1), chirp)
        return out

    def video(self) -> dict[str, bytes]:
        """One short MP4 of a moving shape."""
        return {"video_00.mp4": media.moving_shape_mp4(self.cfg.video_seconds)}

    def photo(self) -> dict[str, bytes]:
        """`photo.jpg`, a picture like the source's but not in it: what the README's commands ask about."""
        img = media.draw_shape((320, 240), "circle", "red", "grey", 0.7, self.cfg.seed * 1_000_003 + 999_983)
        return {PHOTO: media.encode_image(img, "jpg")}

    def cloud(self) -> dict[str, bytes]:
        """`object.ply`, a point cloud of 2,048 points on a cube's surface (what `--point-cloud` can be tried on)."""
        return {CLOUD: media.cube_ply(2048, self.cfg.seed)}

    def metadata(self, base_url: str) -> pa.Table:
        """The rows as a LAION-layout table, URLs under `base_url`."""
        base = base_url.rstrip("/")
        rows = {
            "URL": [base + it.url_path for it in self.items],
            "TEXT": [it.caption for it in self.items],
            "similarity": [it.similarity for it in self.items],
            "WIDTH": [it.width for it in self.items],
            "HEIGHT": [it.height for it in self.items],
            "punsafe": [it.punsafe for it in self.items],
            "pwatermark": [it.pwatermark for it in self.items],
            "LANGUAGE": [it.language for it in self.items],
            "kind": [it.kind for it in self.items],
        }
        return pa.table(rows, schema=METADATA_SCHEMA)


def _replace(item: Item, **changes: object) -> Item:
    return Item(**{**item.__dict__, **changes})


def _duplicate(item: Item, original: Item) -> Item:
    """A row repeating `original`'s URL and caption (as web metadata does)."""
    return _replace(
        original, index=item.index, kind="duplicate", duplicate_of=original.index, similarity=item.similarity
    )


class SyntheticResult(BaseModel):
    """What the synthetic stage produced."""

    rows: int
    good: int
    bad: dict[str, int]
    base_url: str
    metadata_path: str
    media: list[str]
    served: dict[str, int] | None = None
    seconds: float

    def summary(self) -> str:
        """A few human lines."""
        bad = ", ".join(f"{n} {k}" for k, n in self.bad.items()) or "none"
        lines = [
            f"{self.rows} rows ({self.good} good; bad on purpose: {bad}) at {self.base_url}",
            f"metadata: {self.metadata_path}",
            f"media: {', '.join(self.media)}",
        ]
        if self.served is not None:
            lines.append("served as: " + ", ".join(f"{n} {k}" for k, n in self.served.items()))
        return "\n".join(lines)


def written_base_url(ws: Workspace) -> str | None:
    """The server address the committed synthetic metadata was written for, if any."""
    rec = Ledger.reader(ws, "synthetic", "synthetic").committed_record("metadata")
    return rec.extra.get("base_url") if rec else None


def settings(cfg: SyntheticConfig) -> dict[str, object]:
    """The settings that shape the synthetic output (the server's address does not)."""
    return cfg.model_dump(exclude={"host", "port"})


def run(cfg: Config, base_url: str, force: bool = False, check: bool = True) -> SyntheticResult:
    """Write the synthetic source to the workspace: metadata for `base_url` and the audio/video media.

    Args:
        cfg: the root config (its `synthetic` section, workspace and download timeout are used).
        base_url: where the server answers, e.g. `http://127.0.0.1:43123`.
        force: replace a synthetic source written with other settings.
        check: fetch every URL once (with the download timeout) and count what the server answered.
    """
    start = time.perf_counter()
    ws = Workspace(cfg.workspace, cfg.storage_options)
    source = SyntheticSource(cfg.synthetic)
    with Ledger.writing(ws, "synthetic", "synthetic", settings(cfg.synthetic), force=force) as ledger:
        written = []
        for name, data in {**source.audio(), **source.video(), **source.photo(), **source.cloud()}.items():
            final = ws.synthetic("media", name)
            if not ledger.is_committed(name.replace(".", "_")):
                with ledger.shard(name.replace(".", "_")) as shard:
                    ws.write_bytes(shard.path(final), data)
                    shard.rows = 1
            written.append(ws.url("synthetic", "media", name))
        # The metadata carries the server's address: rewritten only when that changed.
        table = source.metadata(base_url)
        meta_path = ws.synthetic("metadata.parquet")
        if written_base_url(ws) != base_url or not ledger.is_committed("metadata"):
            with ledger.shard("metadata") as shard:
                with ws.open(shard.path(meta_path), "wb") as f:
                    pq.write_table(table, f)
                shard.rows = table.num_rows
                shard.extra = {"base_url": base_url}
        kinds = [it.kind for it in source.items]
        bad = {k: kinds.count(k) for k in BAD_KINDS if kinds.count(k)}
        served = None
        if check:
            served = probe(table.column("URL").to_pylist(), timeout=cfg.download.timeout)
        return SyntheticResult(
            rows=len(kinds),
            served=served,
            good=kinds.count("good"),
            bad=bad,
            base_url=base_url,
            metadata_path=ws.url("synthetic", "metadata.parquet"),
            media=written,
            seconds=round(time.perf_counter() - start, 3),
        )
