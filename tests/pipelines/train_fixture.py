"""A small feature set with a learnable signal (the colour lives in the image feature), a tokenizer and a config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model.imagebind.encoder import encoder_id_for
from model.llm.tokenizer import train_bpe_tokenizer
from pipelines.config import Config
from stores import features
from stores.ledger import Ledger
from stores.workspace import Workspace

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
DIM = 1024


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def write_feature_set(
    ws: Workspace, encoder_id: str, source: str = "synthetic", n: int = 96, shards: int = 3, seed: int = 0
) -> list[tuple[str, str, str]]:
    """Committed feature parts whose image_emb encodes colour and shape; returns (uid, colour, shape) rows."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((len(COLOURS) + len(SHAPES), DIM)).astype(np.float32)
    rows = []
    ledger = Ledger(ws, "extract", f"{encoder_id}.{source}", {"encoder_id": encoder_id}, encoder_id=encoder_id)
    per = n // shards
    for s in range(shards):
        uids, caps, urls, emb = [], [], [], []
        for i in range(per):
            c, h = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
            uid = f"{source}-{s}-{i:04d}"
            vec = basis[c] + basis[len(COLOURS) + h] + 0.3 * rng.standard_normal(DIM).astype(np.float32)
            uids.append(uid), caps.append(caption(COLOURS[c], SHAPES[h])), urls.append(f"http://x/{uid}.jpg")
            emb.append(vec / np.linalg.norm(vec))
            rows.append((uid, COLOURS[c], SHAPES[h]))
        shard = f"{s:05d}"
        with ws.scratch() as scratch, ledger.shard(shard) as pending:
            part = os.path.join(scratch, "part.parquet")
            e = np.stack(emb)
            features.write_features(
                part,
                {
                    "uid": uids,
                    "source": [source] * per,
                    "caption": caps,
                    "url": urls,
                    "image_emb": e,
                    "text_emb": e,
                    "clip_score": np.ones(per),
                    "encoder_id": [encoder_id] * per,
                },
                DIM,
            )
            pending.put(part, ws.features(encoder_id, source, f"part-{shard}.parquet"))
            pending.rows = per
    features.write_meta(ws, encoder_id, {"encoder_id": encoder_id, "dim": DIM, "placeholder": [0.01] * DIM})
    return rows


def train_config(tmp: Path, **stage1: object) -> Config:
    """The demo config on `tmp`, a trained tokenizer, small batches; a feature set already written."""
    texts = [caption(c, s) for c in COLOURS for s in SHAPES] * 4 + ["Generate caption of this image"] * 4
    texts += [
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n\n### Response:"
    ] * 4
    tok = train_bpe_tokenizer(texts, vocab_size=1000)
    tok_path = tok.save(str(tmp / "tok"))
    overrides = [
        f"workspace={tmp / 'ws'}",
        f"model.tokenizer_path={tok_path}",
        "train.holdout=0.01",
        "train.stage1.global_batch_size=8",
        "train.stage1.epochs=2",
        "train.stage1.warmup_epochs=0.25",
        "train.stage1.blr=0.02",
        "train.stage1.checkpoint_every_steps=4",
        "train.stage1.workers=1",
        "train.stage2.epochs=2",
        "train.stage2.blr=0.02",
        "train.stage2.checkpoint_every_steps=20",
    ]
    overrides += [f"train.stage1.{k}={v}" for k, v in stage1.items()]
    cfg = Config.from_yaml(None, overrides)
    ws = Workspace(cfg.workspace)
    write_feature_set(ws, encoder_id_for(cfg.model.imagebind, cfg.model.imagebind_checkpoint, cfg.seed))
    return cfg
