"""`ibllm imagine`: images drawn by Stable unCLIP from the (cache-mixed) ImageBind embedding of any inputs."""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel

from model.apps.unclip import Drawing, UnCLIP, check_folder
from model.errors import ModelInputError
from model.imagebind.encoder import ImageBind, resolve_device, resolve_dtype
from model.llm.cache import cache_mix, mix_modalities
from model.llm.model import CacheLookup
from pipelines.apps.output import file_exists, png_bytes, write_file
from pipelines.config import Config
from pipelines.errors import InputError
from pipelines.runtime.encoders import configured_encoder, open_cache
from pipelines.runtime.inputs import PointOptions, Request, check_files, file_requests, weighted_embeddings
from stores.workspace import Workspace

log = logging.getLogger(__name__)
NOTHING = "nothing to imagine from: give image, audio, video, point-cloud or text inputs"


class Picture(BaseModel):
    """One request's images (or the error that stopped it), with what it was drawn from."""

    line: int | None = None
    inputs: dict[str, list[str]] = {}
    weights: dict[str, float] = {}
    prompt: str = ""
    seed: int = 0
    paths: list[str] = []
    error: str | None = None


class ImagineResult(BaseModel):
    """What `ibllm imagine` drew, with which generator, encoder, cache and settings."""

    generator: str
    encoder_id: str
    cache: str | None
    embedding_norm: float
    steps: int
    guidance: float
    noise_level: int
    images: int
    pictures: list[Picture]
    errors: int
    seconds: float

    def summary(self) -> str:
        """One line per written image, and one per failed request."""
        lines = [p for pic in self.pictures for p in pic.paths]
        return "\n".join(lines + [f"line {p.line}: {p.error}" for p in self.pictures if p.error])


@dataclass
class Imaginer:
    """The encoder, the visual cache (when loaded) and the generator: requests in, PIL images out."""

    encoder: ImageBind
    cache: CacheLookup | None
    unclip: UnCLIP
    cfg: Config
    points: PointOptions = field(default_factory=PointOptions)

    @torch.no_grad()
    def embedding(self, req: Request, use_cache: bool | None = None) -> torch.Tensor:
        """The request's (D,) embedding, mixed as generation mixes it: each modality normalised and weighted,
        then, with the cache, mixed with its neighbours (`model.llm.cache`); `use_cache` None: when loaded."""
        if not req.inputs():
            raise InputError(NOTHING)
        if use_cache and self.cache is None:
            raise InputError("cache: no visual cache is loaded here (start with the cache on: --cache)")
        embeddings, weights = weighted_embeddings(self.encoder, req, self.cfg.model.max_image_pixels, self.points)
        mixed = mix_modalities(embeddings, weights)  # (1, D)
        if self.cache is not None and use_cache is not False:
            sims, values = self.cache(mixed)
            mixed = cache_mix(
                mixed,
                sims.to(mixed.device),
                values.to(mixed.device),
                self.cfg.index.cache_t,
                self.cfg.index.cache_weight,
            )
        return mixed[0]

    def draw(self, drawings: list[Drawing], images: int, steps: int, guidance: float, noise_level: int) -> list[list]:
        """Images of each drawing (see `UnCLIP.draw`), at the configured size."""
        return self.unclip.draw(drawings, images, steps, guidance, noise_level, self.cfg.imagine.size)


def load(cfg: Config) -> Imaginer:
    """The configured ImageBind on `infer.device` (with the cache of its features when `infer.use_cache`) and the
    Stable unCLIP generator of `imagine.generator`."""
    path = cfg.imagine.generator
    if not path:
        raise InputError(
            "no generator: set imagine.generator (or --generator) to the folder of "
            "stabilityai/stable-diffusion-2-1-unclip"
        )
    check_folder(path)  # before the encoder loads: a wrong folder is named at once
    ws = Workspace(cfg.workspace, cfg.storage_options)
    encoder = configured_encoder(cfg, ws, cfg.infer.device, cfg.infer.dtype)
    cache = open_cache(cfg, ws, encoder) if cfg.infer.use_cache else None
    return with_encoder(cfg, encoder, cache)


def with_encoder(cfg: Config, encoder: ImageBind, cache: CacheLookup | None) -> Imaginer:
    """An Imaginer over an encoder (and cache) already loaded, e.g. the server's, and the generator of
    `imagine.generator` on `infer.device` in `infer.dtype`."""
    dev = resolve_device(cfg.infer.device)
    dtype = resolve_dtype(cfg.infer.dtype, dev)
    unclip = UnCLIP.load(cfg.imagine.generator, encoder.dim, dev, dtype, cfg.imagine.embedding_norm)
    return Imaginer(encoder, cache, unclip, cfg, PointOptions(cfg.model.point_normalize, cfg.model.point_resample))


def out_paths(out: str, line: int | None, images: int) -> list[str]:
    """Where a request's images go: `out` itself for one image of one request, else `<stem>-<i>` or
    `<stem>-<line>-<i>` beside it (the suffix kept)."""
    if line is None and images == 1:
        return [out]
    stem, suffix = posixpath.splitext(out)
    tag = "" if line is None else f"-{line}"
    return [f"{stem}{tag}-{i}{suffix or '.png'}" for i in range(images)]


def run(
    cfg: Config,
    request: Request | None = None,
    out: str = "imagined.png",
    requests_file: str | None = None,
    force: bool = False,
) -> ImagineResult:
    """Draw `imagine.images` images of one request (its errors raise InputError) or of every line of a JSONL file
    of requests, whose fields override `request`'s (a bad line gets an error entry naming it). Images are written
    as PNG to `out` (several: numbered beside it); an existing file is refused unless `force`."""
    start, s = time.perf_counter(), cfg.imagine
    defaults = request or Request()
    items: list[tuple[int | None, Request | InputError]]
    if requests_file is None:
        if not defaults.inputs():
            raise InputError(NOTHING)
        check_files(defaults)
        items = [(None, defaults)]
    else:
        items = file_requests(defaults, requests_file)
    pictures = [_picture(cfg, n, r, out, s.images) for n, r in items]
    taken = [p for pic in pictures for p in pic.paths if file_exists(p, cfg.storage_options)]
    if taken and not force:
        raise InputError(f"{taken[0]} exists ({len(taken)} of the outputs do): add --force to replace them")
    imaginer = load(cfg)
    todo: list[tuple[Picture, Drawing]] = []
    for (_, req), pic in zip(items, pictures, strict=True):
        if isinstance(req, Request) and pic.error is None:
            try:
                todo.append((pic, Drawing(imaginer.embedding(req), pic.seed, pic.prompt)))
            except (InputError, ModelInputError) as e:
                _fail(pic, e)
    for at in range(0, len(todo), s.batch):
        chunk = todo[at : at + s.batch]
        drawn = imaginer.draw([d for _, d in chunk], s.images, s.steps, s.guidance, s.noise_level)
        for (pic, _), images in zip(chunk, drawn, strict=True):
            for path, image in zip(pic.paths, images, strict=True):
                write_file(path, png_bytes(image), cfg.storage_options)
    return ImagineResult(
        generator=imaginer.unclip.path,
        encoder_id=imaginer.encoder.encoder_id,
        cache=cfg.index.name if imaginer.cache else None,
        embedding_norm=imaginer.unclip.norm,
        steps=s.steps,
        guidance=s.guidance,
        noise_level=s.noise_level,
        images=s.images,
        pictures=pictures,
        errors=sum(p.error is not None for p in pictures),
        seconds=round(time.perf_counter() - start, 3),
    )


def _picture(cfg: Config, line: int | None, req: Request | InputError, out: str, images: int) -> Picture:
    if isinstance(req, InputError):
        return Picture(line=line, error=str(req))
    given = req.inputs()
    pic = Picture(
        line=line,
        inputs=given,
        weights={m: req.weights.get(m, 1.0) for m in given},
        prompt=req.prompt or "",
        seed=cfg.seed if req.seed is None else req.seed,
        paths=out_paths(out, line, images),
    )
    if line is not None and not given:
        _fail(pic, InputError(NOTHING))
    return pic


def _fail(pic: Picture, e: Exception) -> None:
    if pic.line is None:
        raise e
    pic.error, pic.paths = f"line {pic.line}: {e}", []
