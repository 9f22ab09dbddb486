"""The demo's stage-2 data: LLaVA-style conversations about the training images, generated from their captions."""

from __future__ import annotations

import json
import logging

from pydantic import BaseModel

from model.imagebind.encoder import encoder_id_for
from pipelines.assets import DEMO_INSTRUCTIONS
from pipelines.config import Config
from pipelines.demo import text as demo_text
from pipelines.train.data import is_heldout
from pipelines.train.setup import stage1_features
from stores.features import read_columns
from stores.instructions import image_key
from stores.workspace import Workspace

log = logging.getLogger(__name__)
TURNS = len(demo_text.QUESTIONS) + 1  # and a yes/no question


class InstructionsResult(BaseModel):
    """The generated instruction file."""

    path: str
    images: int
    samples: int
    skipped: int

    def summary(self) -> str:
        return (
            f"instructions: {self.images} training images, a conversation of {TURNS} "
            f"questions about each = {self.samples} samples ({self.skipped} captions not understood) -> "
            f"{self.path}"
        )


def run(cfg: Config) -> InstructionsResult:
    """Write `instructions/synthetic.json` for the training split of stage 1's features (held-out images never)."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    records, captions = _conversations(cfg, ws)
    path = ws.path(*DEMO_INSTRUCTIONS)
    data = _encode(records)
    if not ws.exists(path) or ws.read_bytes(path) != data:
        ws.write_bytes(path, data)
    per = TURNS if cfg.train.stage2.conversation == "turns" else 1  # first, whole: one each
    samples = len(records) * per
    log.info("demo instructions: %d images, %d samples -> %s", len(records), samples, path)
    return InstructionsResult(
        path=ws.as_url(path), images=len(records), samples=samples, skipped=captions - len(records)
    )


def up_to_date(cfg: Config) -> bool:
    """True when `instructions/synthetic.json` holds the conversations of the current training images."""
    ws = Workspace(cfg.workspace, cfg.storage_options)
    path = ws.path(*DEMO_INSTRUCTIONS)
    return ws.exists(path) and ws.read_bytes(path) == _encode(_conversations(cfg, ws)[0])


def _conversations(cfg: Config, ws: Workspace) -> tuple[list[dict], int]:
    """The conversations about stage 1's training images, and how many captions were read."""
    encoder_id = encoder_id_for(cfg.model.imagebind, cfg.model.imagebind_checkpoint, cfg.seed)
    rows: list[tuple[str, str]] = []
    for part in stage1_features(cfg, ws, encoder_id):
        cols = read_columns(ws, part, ["uid", "url", "caption"])
        for uid, url, caption in zip(cols["uid"], cols["url"], cols["caption"], strict=True):
            if not is_heldout(uid, cfg.train.holdout):
                rows.append((image_key(url), caption))
    return demo_text.conversations(sorted(rows)), len(rows)


def _encode(records: list[dict]) -> bytes:
    return json.dumps(records, indent=0).encode()
