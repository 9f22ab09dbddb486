"""The configured ImageBind and the visual cache over its features, as a trained model uses them."""

from __future__ import annotations

import logging

import numpy as np
import torch

from model.imagebind.encoder import DType, ImageBind
from model.llm.model import CacheLookup
from pipelines import assets
from pipelines.config import Config
from pipelines.errors import InputError
from stores.index import CacheIndex, IndexMismatch
from stores.workspace import Workspace

log = logging.getLogger(__name__)


def configured_encoder(cfg: Config, ws: Workspace, device: str, dtype: DType) -> ImageBind:
    """The configured ImageBind (its point branch when configured) with the CLIP vocabulary of the config or demo."""
    m = cfg.model
    vocab = assets.clip_vocab_file(cfg, ws)
    return ImageBind.load(
        m.imagebind,
        checkpoint=m.imagebind_checkpoint,
        vocab=vocab,
        device=device,
        dtype=dtype,
        seed=cfg.seed,
        point_checkpoint=m.point_checkpoint,
    )


def open_cache(cfg: Config, ws: Workspace, encoder: ImageBind) -> CacheLookup:
    """The visual cache of the encoder's features (`index.name`) as a lookup; InputError when missing or built for
    another encoder."""
    try:
        index = CacheIndex.open(ws, cfg.index.name, encoder.encoder_id, encoder.dim, cfg.index.use_gpu)
    except (FileNotFoundError, IndexMismatch) as e:
        raise InputError(str(e)) from None
    return cache_lookup(index, cfg.index.cache_k)


def cache_lookup(index: CacheIndex, k: int) -> CacheLookup:
    """The model's cache callable over an opened index: (B, D) mixed query -> sims (B, k), neighbours (B, k, D).

    As the reference, the query is searched as it is, not normalised: a mix of several modalities has a norm below 1,
    and the similarities that `model.llm.cache.cache_mix` takes the softmax of are its inner products with the cached
    (unit) features. With `index.values: float32` the neighbours are the stored features exactly.
    """
    k = min(k, index.count)

    def lookup(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = query.detach().float().cpu().numpy()
        sims, ids = index.search(q, k)
        return torch.from_numpy(sims), torch.from_numpy(index.gather(np.where(ids < 0, 0, ids)))

    return lookup


def encoder_and_cache(
    cfg: Config, ws: Workspace, checkpoint: str, trained: str | None, feature_dim: int, use_cache: bool
) -> tuple[ImageBind, CacheLookup | None]:
    """The configured ImageBind on `infer.device`, refused when the checkpoint was trained on another, and the cache
    lookup when `use_cache`."""
    encoder = configured_encoder(cfg, ws, cfg.infer.device, cfg.infer.dtype)
    if trained and trained != encoder.encoder_id:
        raise InputError(
            f"checkpoint {checkpoint} was trained on encoder {trained}, but the configured encoder is "
            f"{encoder.encoder_id} (model.imagebind, model.imagebind_checkpoint, seed): use the encoder it was "
            "trained on, or a checkpoint trained on this one"
        )
    if not trained:
        log.warning("%s records no encoder id: assuming it was trained on %s", checkpoint, encoder.encoder_id)
    if encoder.dim != feature_dim:
        raise InputError(f"the encoder gives {encoder.dim}-d embeddings, checkpoint {checkpoint} takes {feature_dim}")
    return encoder, open_cache(cfg, ws, encoder) if use_cache else None
