"""Config sections of the model and its training: model files, stages 0-2, scheduled retraining."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import SOURCE_NAME, Conversation, Section
from pipelines.config.names import LLM_BENCHMARKS, MME_SUBTASKS, ZERO_SHOT
from pipelines.paths import absolute
from stores.registry import METRIC as HELD_OUT_METRIC


class ModelConfig(Section):
    """Encoders and language model: presets for what is built, paths for what is loaded."""

    imagebind: Literal["huge", "base", "tiny"] = "tiny"
    imagebind_checkpoint: str | None = Field(None, description="imagebind_huge.pth (or .safetensors) as released")
    imagebind_vocab: str | None = Field(None, description="CLIP BPE vocabulary, bpe_simple_vocab_16e6.txt.gz")
    point_checkpoint: str | None = Field(
        None,
        description="imagebind_w3D.pth (Point-Bind): its 3D point branch is loaded beside imagebind_checkpoint "
        "for point-cloud inputs",
    )
    point_normalize: bool = Field(
        False,
        description="centre each point cloud and scale it into the unit sphere (Point-Bind's training data; "
        "ImageBind-LLM's inference does not)",
    )
    point_resample: int | None = Field(
        None,
        gt=0,
        description="resample each point cloud to this many points (Point-BERT's clouds have 8192); none: as given",
    )
    detector: str | None = Field(
        None,
        description="`generate --ground`: a transformers OWLv2 or Grounding DINO folder (e.g. "
        "google/owlv2-base-patch16-ensemble, downloaded beforehand)",
    )
    noun_parser: str | None = Field(
        None,
        description="`generate --ground`: an installed spaCy pipeline (e.g. en_core_web_sm) whose noun chunks "
        "are the phrases to find; none: the built-in rules",
    )
    llama: Literal["7B", "tiny"] = "tiny"
    llama_path: str | None = None
    tokenizer_path: str | None = None
    adapter_checkpoint: str | None = None
    lora_rank: int = Field(16, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    max_seq_len: int = Field(512, gt=0)
    max_image_pixels: int = Field(
        89_478_485,
        gt=0,
        description="extraction and generate refuse an image (or video frames) with more pixels, "
        "from its header, before decoding it; PIL's decompression-bomb limit by default (PIL itself refuses above "
        "twice that)",
    )

    @field_validator(
        "imagebind_checkpoint",
        "imagebind_vocab",
        "point_checkpoint",
        "detector",
        "llama_path",
        "tokenizer_path",
        "adapter_checkpoint",
    )
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute(value) if value else value


class StageConfig(Section):
    """One training stage; lr = blr * global_batch_size / 256, as in the reference."""

    epochs: float = Field(gt=0)
    warmup_epochs: float = Field(ge=0)
    global_batch_size: int = Field(gt=0)
    blr: float = Field(gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(ge=0)
    max_words: int = Field(gt=0)
    accum_iter: int = Field(1, gt=0, description="micro-batches per worker and step (or set micro_batch)")
    micro_batch: int | None = Field(
        None,
        gt=0,
        description="examples per forward and backward on each worker; accum_iter follows: "
        "global_batch_size / (workers x micro_batch). Raise it as far as device memory allows (fewer, larger "
        "steps of the GPU)",
    )
    clip_grad: float | None = Field(None, gt=0)
    workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU when use_gpu)")
    use_gpu: bool = False
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each training worker also needs (a node label)"
    )
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray Train's placement of the workers: PACK fills a node first; STRICT_SPREAD puts each "
        "worker on a node of its own",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how 2+ workers split the work: ddp replicates the model on every worker; fsdp shards the "
        "frozen base and the adapter over the workers: for bases that do not fit one device",
    )
    checkpoint_every_steps: int = Field(500, gt=0)
    data: list[str] = Field(default_factory=list, description="feature sources or instruction files")
    shuffle_buffer: int = Field(10_000, gt=0, description="stage 1: rows shuffled in memory while streaming")
    conversation: Conversation = Field(
        "turns",
        description="stage 2, how a conversation becomes samples: turns, one per (human, gpt) pair; first, its first "
        "pair only (the reference); whole, one sample scoring every answer",
    )
    first_turn_only: bool = Field(False, description="stage 2, deprecated: true is `conversation: first`")

    @field_validator("data")
    @classmethod
    def _absolute_files(cls, data: list[str]) -> list[str]:
        # stage 1 names feature sources, stage 2 instruction files: only what is not a source name is a path
        return [d if re.fullmatch(SOURCE_NAME, d) else absolute(d) for d in data]

    @property
    def lr(self) -> float:
        """Absolute learning rate."""
        return self.blr * self.global_batch_size / 256

    @model_validator(mode="before")
    @classmethod
    def _first_turn_only(cls, data: Any) -> Any:
        # The deprecated flag is an alias of `conversation: first`; a dumped config spells out `turns`, the default.
        if isinstance(data, dict) and data.get("first_turn_only"):
            if data.get("conversation") == "whole":
                raise ValueError(
                    "first_turn_only: true (deprecated: it means conversation: first) conflicts with "
                    "conversation: whole; keep one of them"
                )
            data = {**data, "conversation": "first"}
        return data

    @model_validator(mode="after")
    def _warmup(self) -> StageConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self

    def micro_batches(self, world: int) -> int:
        """Micro-batches per worker and step on `world` workers: accum_iter, or what micro_batch makes of the
        global batch (ValueError when `world` x micro_batch does not divide it)."""
        if self.micro_batch is None:
            return self.accum_iter
        if self.global_batch_size % (world * self.micro_batch):
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by workers x micro_batch "
                f"({world} x {self.micro_batch})"
            )
        return self.global_batch_size // (world * self.micro_batch)

    @model_validator(mode="after")
    def _micro_batch(self) -> StageConfig:
        if self.micro_batch is not None and self.accum_iter != 1:
            raise ValueError("set accum_iter or micro_batch, not both (micro_batch decides accum_iter)")
        self.micro_batches(self.workers)  # raises unless workers x micro_batch divides the global batch (so 1 does)
        return self
        if self.accum_iter != 1:
            raise ValueError("set accum_iter or micro_batch, not both (micro_batch decides accum_iter)")
        if self.global_batch_size % (self.workers * self.micro_batch):
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by workers x micro_batch "
                f"({self.workers} x {self.micro_batch})"
            )
        return self


class BaseLMConfig(Section):
    """The demo's stage 0: a small LLaMA and BPE tokenizer trained on the synthetic source's language."""

    dim: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(384, gt=0)
    vocab_size: int = Field(512, ge=259, description="BPE vocabulary: 3 specials, 256 bytes, the rest merges")
    texts: int = Field(4000, gt=0, description="generated captions and question-answer pairs")
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)


class TrainConfig(Section):
    """Stage 1 (bind network, gates, prefix) and stage 2 (LoRA, biases, norms); stage 0 only in the demo."""

    stage0: BaseLMConfig | None = Field(None, description="the demo's own base LLaMA (stands in for a real one)")
    holdout: float = Field(0.01, ge=0, lt=1, description="share of feature rows (by uid hash) kept out for evaluation")
    max_loss_ratio: float | None = Field(
        None,
        gt=1,
        description="the divergence guard's spike check: a step whose loss is above this many times the median of "
        "the last 100 steps stops the run before it is applied (exit 8), as a non-finite loss or gradient always "
        "does. Off (null) by default: a small model at a high learning rate (the demo's stage 1) spikes to 13x and "
        "recovers; the paper's recipe sets 10",
    )

    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the frozen LLaMA projections and head while training (every checkpoint tensor and "
        "the token embeddings stay float32): auto = bfloat16 on CUDA, float32 on CPU. bfloat16 halves their "
        "memory and saves autocast's casts of them, same results under autocast (which then runs on a CPU too)",
    )
    fused_kernels: Literal["auto", "off"] = Field(
        "auto",
        description="auto: the loss through Liger-Kernel's fused linear cross-entropy when it is installed "
        "(extra gpu-train) and the device is CUDA; otherwise, and with off, our chunked cross-entropy",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute every decoder layer in backward instead of keeping its activations: for "
        "micro-batches that do not fit otherwise (about a third more compute)",
    )

    stage1: StageConfig = Field(
        default_factory=lambda: StageConfig(
            epochs=3, warmup_epochs=0.1, global_batch_size=1024, blr=1e-4, weight_decay=0.05, max_words=96
        )
    )
    stage2: StageConfig = Field(
        default_factory=lambda: StageConfig(
            epochs=4, warmup_epochs=1, global_batch_size=32, blr=1e-3, weight_decay=0.02, max_words=512
        )
    )


class RetrainConfig(Section):
    """Scheduled retraining: new shards -> extract -> index -> stage 1 -> stage 2 -> promote when at least as good."""

    cron: str = Field("0 3 * * 0", description="weekly by default: Sunday 03:00")
    timezone: str = "UTC"
    heldout_size: int = Field(
        1000, ge=2, description="held-out uids frozen at the first retrain: every candidate is measured on them"
    )
    eval_batch_size: int = Field(32, gt=0, description="held-out captions (or benchmark questions) per batch")
    metric: str = Field(
        HELD_OUT_METRIC,
        description="the yardstick: heldout_caption_loss (the frozen held-out captions' "
        "loss, lower is better) or a benchmark's score on metric_data (higher is better): mme (perception + "
        "cognition), mme:<subtask|perception|cognition>, vqa (accuracy), captions (CIDEr-D)",
    )
    metric_data: str | None = Field(None, description="the benchmark's folder or file, for a benchmark metric")
    local: bool = Field(False, description="train in this process with one worker instead of Ray Train (small runs)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        name, _, part = metric.partition(":")
        if metric == HELD_OUT_METRIC or (name in LLM_BENCHMARKS and not part):
            return metric
        if name == "mme" and part in (*MME_SUBTASKS, "perception", "cognition"):
            return metric
        if name in ZERO_SHOT:
            raise ValueError(
                f"{metric} checks the frozen encoder, the same for every candidate: it cannot choose between models"
            )
        raise ValueError(
            f"unknown metric {metric!r}: heldout_caption_loss, mme[:<subtask|perception|cognition>], vqa or captions"
        )

    @field_validator("metric_data")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute(value) if value else value

    @model_validator(mode="after")
    def _data_for_a_benchmark(self) -> RetrainConfig:
        if self.metric != HELD_OUT_METRIC and not self.metric_data:
            raise ValueError(f"metric {self.metric} needs metric_data: the benchmark's folder or file")
        return self

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError(f"cron needs 5 fields (minute hour day month weekday), got {cron!r}")
        return cron
