"""The demo's CLIP vocabulary: without model.imagebind_vocab on a small preset, one learned from the captions."""

from __future__ import annotations

import logging
import os

from model.imagebind.tokenizer import learn_merges, write_vocab
from pipelines.assets import DEMO_VOCAB
from pipelines.config import Config
from stores.catalog import Catalog, outputs
from stores.workspace import Workspace

log = logging.getLogger(__name__)
MERGES = 2000


def needs_demo_vocab(cfg: Config) -> bool:
    """True when no vocabulary is configured and the preset is small enough for a learned one (not `huge`)."""
    return not cfg.model.imagebind_vocab and cfg.model.imagebind != "huge"


def learn(cfg: Config) -> str | None:
    """Learn the vocabulary into the workspace when the config needs one and it is missing; returns its path."""
    if not needs_demo_vocab(cfg):
        return None
    ws = Workspace(cfg.workspace, cfg.storage_options)
    path = ws.path(*DEMO_VOCAB)
    if not outputs(ws, "download"):  # nothing downloaded yet: extraction says what to run first
        return None
    if not ws.exists(path):  # a small vocabulary of the same format, learned from the data (no download)
        captions = [r[0] for r in Catalog(ws).query("SELECT caption FROM curated ORDER BY uid")]
        with ws.scratch() as scratch:
            local = os.path.join(scratch, "vocab.txt.gz")
            write_vocab(local, learn_merges(captions, MERGES))
            ws.upload(local, path)
        log.info("learned the demo's CLIP vocabulary (%d merges) from %d curated captions", MERGES, len(captions))
    return path
