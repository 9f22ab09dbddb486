"""A trained model ready to answer: the chosen checkpoint loaded with its encoder, cache and generation engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model.imagebind.encoder import ImageBind, resolve_device, resolve_dtype
from model.llm.engine import Engine
from model.llm.generate import Sampling
from model.llm.model import CacheLookup
from pipelines.config import Config
from pipelines.runtime import checkpoints
from pipelines.runtime.answerer import Answerer
from pipelines.runtime.encoders import encoder_and_cache
from pipelines.runtime.inputs import PointOptions
from stores.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """The answerer of a checkpoint, the checkpoint's path and what it is (its config, run and encoder)."""

    answerer: Answerer
    checkpoint: str
    trained: checkpoints.Trained


def workspace(cfg: Config) -> Workspace:
    """The configured workspace."""
    return Workspace(cfg.workspace, cfg.storage_options)


def sampling_defaults(cfg: Config) -> Sampling:
    """A request's sampling where it gives none: `infer.temperature`, `infer.top_p`, `infer.max_new_tokens`."""
    i = cfg.infer
    return Sampling(temperature=i.temperature, top_p=i.top_p, max_new_tokens=i.max_new_tokens)


def load(cfg: Config, need_encoder: bool = True, slots: int | None = None, chosen: str | None = None) -> Loaded:
    """The model of `infer.checkpoint` (else the promoted or newest run; `chosen`: a checkpoint the caller chose
    already) on `infer.device` in `infer.dtype`, with `slots` KV-cache slots (default `infer.batch`). The encoder (and
    the cache, when `infer.use_cache`) is loaded now when `need_encoder`, else on first need."""
    ws = workspace(cfg)
    chosen = chosen or checkpoints.choose(ws, cfg.infer.checkpoint)
    trained = checkpoints.inspect(cfg, ws, chosen)
    log.info("answering with %s", describe(chosen, trained))  # what it is; `choose` logged why
    dev = resolve_device(cfg.infer.device)

    def load_encoder() -> tuple[ImageBind, CacheLookup | None]:
        dim = trained.config.feature_dim
        return encoder_and_cache(cfg, ws, chosen, trained.encoder_id, dim, cfg.infer.use_cache)

    encoder, cache = load_encoder() if need_encoder else (None, None)
    model, tokenizer = checkpoints.load(cfg, ws, trained, resolve_dtype(cfg.infer.dtype, dev))
    model = model.to(dev).eval()
    engine = Engine(model, slots=slots or cfg.infer.batch, device=dev)
    model.keep_visual_path_only()  # the engine holds the language model now
    answerer = Answerer(
        model,
        tokenizer,
        engine,
        sampling_defaults(cfg),
        encoder,
        cache,
        cfg.index.cache_t,
        cfg.index.cache_weight,
        cfg.model.max_image_pixels,
        PointOptions(cfg.model.point_normalize, cfg.model.point_resample),
        load_encoder,
    )
    return Loaded(answerer, chosen, trained)


def describe(checkpoint: str, trained: checkpoints.Trained) -> str:
    """The checkpoint with the run that made it, for a log line."""
    made = trained.made_by
    if made.get("run_id"):
        return f"{checkpoint} (stage {made.get('stage')} run {made['run_id']}, step {made.get('step', '?')})"
    return checkpoint
