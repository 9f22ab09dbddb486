"""A training run as the driver resolved it: the configured training section and what it resolved to."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from pipelines.config import StageConfig, TrainConfig
from pipelines.train.schedule import Hyper

# run.json's `job`, field by field in its order (the record's format; `Runs.same_inputs` compares it to find a run
# of the same inputs and settings): where the Job keeps each
RECORD = {
    "stage": "stage",
    "run_id": "run_id",
    "workspace": "workspace",
    "storage_options": "storage_options",
    "seed": "seed",
    "llm": "llm",
    "tokenizer": "tokenizer",
    "base_llama": "base_llama",
    "init_checkpoint": "init_checkpoint",
    "encoder_id": "encoder_id",
    "feature_files": "feature_files",
    "instruction_files": "instruction_files",
    "global_batch": "settings.global_batch_size",
    "accum": "settings.accum_iter",
    "max_words": "settings.max_words",
    "lr": "hyper.lr",
    "min_lr": "hyper.min_lr",
    "weight_decay": "hyper.weight_decay",
    "warmup_steps": "hyper.warmup_steps",
    "total_steps": "hyper.total_steps",
    "steps_per_epoch": "steps_per_epoch",
    "examples": "examples",
    "clip_grad": "hyper.clip_grad",
    "checkpoint_every": "settings.checkpoint_every_steps",
    "use_gpu": "settings.use_gpu",
    "workers": "settings.workers",
    "shuffle_buffer": "settings.shuffle_buffer",
    "holdout": "train.holdout",
    "conversation": "settings.conversation",
    "max_steps": "max_steps",
    "parallel": "settings.parallel",
    "micro_batch": "settings.micro_batch",
    "base_dtype": "train.base_dtype",
    "fused_kernels": "train.fused_kernels",
    "activation_checkpointing": "train.activation_checkpointing",
}


@dataclass(frozen=True)
class Job:
    """Everything a worker needs. It travels whole to the Ray workers (the config sections are pydantic models,
    which pickle); `record()` is what the run's record keeps of it."""

    stage: int
    run_id: str
    workspace: str
    storage_options: dict[str, Any]
    seed: int
    train: TrainConfig  # a copy of the config's: this stage's settings, the holdout, how the steps compute
    llm: dict[str, Any]  # the language model's LLMConfig, as `to_dict` gives it
    tokenizer: str
    base_llama: str | None
    init_checkpoint: str | None  # stage 2: the stage-1 checkpoint it starts from
    encoder_id: str
    feature_files: list[str]
    instruction_files: list[str]
    examples: int  # training examples of an epoch
    steps_per_epoch: int
    max_steps: int | None = None  # stop earlier (a run that stops there is `stopped`, not `complete`)

    @property
    def settings(self) -> StageConfig:
        """The stage's section of the training config."""
        return getattr(self.train, f"stage{self.stage}")

    @property
    def hyper(self) -> Hyper:
        """The stage's optimisation over this run's steps."""
        return Hyper.of(self.settings, self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run (its epochs)."""
        return self.hyper.total_steps

    @property
    def conversation(self) -> str:
        """Stage 2: how a conversation becomes samples (StageConfig.conversation)."""
        return self.settings.conversation

    def record(self) -> dict[str, Any]:
        """The job as run.json records it: the fields of RECORD, flat, and an empty `notes` (kept for the format)."""
        return copy.deepcopy({key: attrgetter(path)(self) for key, path in RECORD.items()} | {"notes": {}})
