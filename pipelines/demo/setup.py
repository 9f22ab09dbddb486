"""The demo's own inputs of training and retraining, made when missing: its base LLaMA (stage 0) and conversations."""

from __future__ import annotations

from pydantic import BaseModel

from pipelines.config import Config
from pipelines.demo import base_lm
from pipelines.demo import data as demo_data
from pipelines.demo.base_lm import BaseLMResult
from pipelines.demo.data import InstructionsResult


def needs_demo_base(cfg: Config) -> bool:
    """True on a demo configuration (`train.stage0` set) where no base LLaMA or tokenizer is configured."""
    return cfg.train.stage0 is not None and not cfg.model.llama_path and not cfg.model.tokenizer_path


def prepare_training(cfg: Config, stage: int) -> None:
    """Before `train --stage N` on the demo configuration: stage 0's base and, for stage 2 without
    `train.stage2.data`, the generated conversations about the training images, each made only when missing or out
    of date (quietly nothing when both are current, as after the demo flow's own steps)."""
    if needs_demo_base(cfg) and not base_lm.up_to_date(cfg):
        base_lm.run(cfg)  # logs what it did
    if stage == 2 and cfg.train.stage0 is not None and not cfg.train.stage2.data and not demo_data.up_to_date(cfg):
        demo_data.run(cfg)


class RetrainInputs(BaseModel):
    """The demo's own inputs of a retrain, made when the config asks for them (both idempotent)."""

    base: BaseLMResult | None = None
    instructions: InstructionsResult | None = None


def retrain_inputs(cfg: Config) -> RetrainInputs:
    """The demo's stage 0 base (when `train.stage0` is set without `model.llama_path`) and, when
    `train.stage2.data` is empty, stage 2's generated instructions, regenerated so that new images are asked about."""
    base = base_lm.run(cfg) if cfg.train.stage0 is not None and not cfg.model.llama_path else None
    instructions = demo_data.run(cfg) if not cfg.train.stage2.data else None
    return RetrainInputs(base=base, instructions=instructions)
