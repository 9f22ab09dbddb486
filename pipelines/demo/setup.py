"""The demo's own inputs of a training stage, made when missing: its base LLaMA (stage 0) and stage-2 conversations."""

from __future__ import annotations

from pipelines.config import Config
from pipelines.demo import base_lm
from pipelines.demo import data as demo_data


def needs_demo_base(cfg: Config) -> bool:
    """True on a demo configuration (`train.stage0` set) where no base LLaMA or tokenizer is configured."""
    return cfg.train.stage0 is not None and not cfg.model.llama_path and not cfg.model.tokenizer_path


def prepare_training(cfg: Config, stage: int) -> None:
    """Before `train --stage N` on the demo configuration: stage 0's base (up to date: nothing to do) and, for
    stage 2 without `train.stage2.data`, the generated conversations about the training images."""
    if needs_demo_base(cfg):
        base_lm.run(cfg)  # logs what it did
    if stage == 2 and cfg.train.stage0 is not None and not cfg.train.stage2.data:
        demo_data.run(cfg)
