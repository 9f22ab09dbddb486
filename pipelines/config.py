"""Typed configuration: one root model with a section per stage, loaded from YAML with dotted overrides."""

from __future__ import annotations

import ipaddress
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.download.guard import networks
from pipelines.evaluate.mme import SUBTASKS
from pipelines.evaluate.names import LLM_BENCHMARKS, ZERO_SHOT
from pipelines.paths import absolute, absolute_paths
from stores.metadata import CAPTION_MAX_CHARS
from stores.registry import METRIC as HELD_OUT_METRIC

DEMO_CONFIG = "demo.yaml"
Conversation = Literal["turns", "first", "whole"]  # how stage 2 makes samples of a conversation (StageConfig)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Section):
    """The generated source of the demo and the tests (coloured shapes served on loopback)."""

    count: int = Field(200, gt=0, description="images in the source, good and bad entries together")
    seed: int = 0
    bad_fraction: float = Field(0.1, ge=0.0, le=0.9, description="share of entries that are bad on purpose")
    min_side: int = Field(64, ge=16)
    max_side: int = Field(320, ge=16)
    png_fraction: float = Field(0.3, ge=0.0, le=1.0)
    slow_seconds: float = Field(5.0, gt=0, description="delay of the 'slow' bad entry; set above the timeout")
    audio_clips: int = Field(3, ge=0)
    audio_seconds: float = Field(2.0, gt=0, le=30)
    video_seconds: float = Field(2.0, gt=0, le=30)
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free ephemeral port")

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, host: str) -> str:
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the synthetic server binds loopback addresses only, not {host!r}")
        return host

    @model_validator(mode="after")
    def _sides(self) -> SyntheticConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} is larger than max_side {self.max_side}")
        return self


class FilterConfig(Section):
    """Per-source curation filters; None disables a filter."""

    min_similarity: float | None = Field(None, ge=-1.0, le=1.0)
    top_k: int | None = Field(None, gt=0, description="keep the K rows with the highest similarity")
    min_width: int = Field(0, ge=0)
    min_height: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, ge=1.0)
    min_caption_words: int = Field(0, ge=0)
    max_caption_words: int | None = Field(None, gt=0)
    min_caption_chars: int = Field(0, ge=0)
    max_caption_chars: int | None = Field(None, gt=0)
    languages: list[str] | None = None
    max_punsafe: float | None = Field(None, ge=0.0, le=1.0)
    max_pwatermark: float | None = Field(None, ge=0.0, le=1.0)
    sample: int | None = Field(None, gt=0, description="deterministic sample to at most this many rows")


SOURCE_NAME = r"^[a-z0-9][a-z0-9_]*$"
SourceFormat = Literal["synthetic", "laion", "mmc4", "cc3m", "cc12m", "sbu", "coco", "coyo", "generic"]


class SourceConfig(Section):
    """One metadata source: where it is, how to read it, how to filter it."""

    name: str = Field(pattern=SOURCE_NAME)
    format: SourceFormat
    paths: list[str] = Field(default_factory=list, description="files or globs; empty for 'synthetic'")
    columns: dict[str, str] = Field(default_factory=dict, description="generic format: our column -> theirs")
    filters: FilterConfig = Field(default_factory=FilterConfig)

    _absolute_paths = field_validator("paths")(absolute_paths)


class CurateConfig(Section):
    """DuckDB resources of ingest and curation, and the size of the url-list files."""

    memory_limit: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
    threads: int | None = Field(None, gt=0)
    rows_per_file: int = Field(1_000_000, gt=0, description="rows per curated url-list file")
    caption_max_chars: int = Field(
        CAPTION_MAX_CHARS, gt=0, description="captions are cut to this many characters (control characters become "
        "spaces) at ingest and when extraction reads a shard"
    )  # fmt: skip


DEADLINE_FACTOR = 3  # download.deadline, when unset, is this many timeouts


class DownloadConfig(Section):
    """img2dataset settings."""

    image_size: int = Field(256, ge=32)
    resize_mode: Literal["keep_ratio", "center_crop"] = "keep_ratio"
    processes: int = Field(2, gt=0)
    threads: int = Field(16, gt=0)
    timeout: float = Field(2.0, gt=0, description="seconds per connect and per read")
    deadline: float | None = Field(
        None, gt=0, description="seconds per sample from its first byte asked to its last, retries included; a "
        "slower answer (a drip) is cut off as a timeout. Default (null): 3 x timeout"
    )  # fmt: skip
    retries: int = Field(1, ge=0)
    samples_per_shard: int = Field(10_000, gt=0)
    min_image_size: int = Field(0, ge=0, description="refuse images whose short side is smaller")
    max_image_area: int | None = Field(
        89_478_485, gt=0, description="refuse larger images (decompression bombs); PIL's limit by default"
    )
    distributor: Literal["multiprocessing", "ray", "pyspark"] = "multiprocessing"
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    allow_private_addresses: bool | list[str] = Field(
        False, description="fetch from non-public addresses (loopback, private, link-local, multicast, reserved, "
        "unspecified; IPv4 and IPv6): false refuses them as `blocked_address` (the default: a URL list cannot make "
        "the downloader reach the local network), true allows them all (the demo's loopback server), a list of CIDR "
        "networks allows those only, e.g. [10.1.0.0/16]; checked on every connection, redirects included"
    )  # fmt: skip

    @field_validator("allow_private_addresses")
    @classmethod
    def _networks(cls, allow: bool | list[str]) -> bool | list[str]:
        if isinstance(allow, bool):
            return allow
        return [str(net) for net in networks(allow)]

    @property
    def deadline_seconds(self) -> float:
        """The deadline per sample: `deadline`, or DEADLINE_FACTOR x `timeout` when unset."""
        return self.deadline or DEADLINE_FACTOR * self.timeout


class ExtractConfig(Section):
    """ImageBind feature extraction on Ray."""

    batch_size: int = Field(64, gt=0, description="samples per encoder call")
    actors: int = Field(1, gt=0, description="encoder actors; on GPUs 1 means one per GPU of the cluster")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per encoder actor (also its torch threads)")
    task_cpus: float = Field(0.5, gt=0, description="CPUs reserved per read/decode/preprocess task")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each encoder actor also needs: a node label such "
        "as {encoder_node: 1} keeps the actors on the nodes that offer it (one per unit offered)"
    )  # fmt: skip
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="bf16 on GPU when auto; on a GPU a half dtype casts the frozen weights to it, on the CPU "
        "it runs as autocast over float32 weights"
    )  # fmt: skip
    fp8: bool = Field(
        False, description="FP8 linear layers in the vision trunk (GPUs of compute capability >= 8.9, bfloat16, the "
        "fp8 extra: torchao); it changes the features, so it is one of the feature set's settings"
    )  # fmt: skip
    buffer_mb: int | None = Field(
        512, gt=0, description="object store memory Ray Data may fill with decoded samples waiting for the encoder "
        "(a soft limit across the cluster; null: Ray's default share of the object store)"
    )  # fmt: skip
    prefetch_batches: int = Field(
        0, ge=0, description="encoded blocks the driver fetches ahead; each one delays its shard's commit, so the "
        "default 0 commits a shard as soon as it is encoded (the actors never wait on the driver)"
    )  # fmt: skip


class IndexConfig(Section):
    """The visual cache: an autofaiss index over one feature source, and the mixing defaults."""

    name: str = Field("cache", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    source: str = "cc3m"
    max_index_memory: str = Field("4G", pattern=r"^\d+(\.\d+)?[KMG]$", description="autofaiss's index budget")
    max_query_ms: float = Field(10.0, gt=0)
    index_key: str | None = Field(
        None, description="a fixed faiss index key; default: IVF + 4-bit fast-scan PQ sized to the budget, or "
        "autofaiss's choice for sets up to 100k vectors whose flat index fits"
    )  # fmt: skip
    index_param: str | None = Field(None, description="first search parameters of index_key (e.g. nprobe=16)")
    rescore: int = Field(8, ge=1, description="candidates per neighbour re-scored exactly (tuning may raise it)")
    holdout: int = Field(500, gt=0, description="held-out queries for the recall@10 in meta.json")
    target_recall: float = Field(0.95, gt=0, le=1, description="nprobe and re-scoring rise until recall@10 is this")
    use_gpu: bool = Field(False, description="search with faiss-gpu (the gpu extra) when a GPU is present")
    values: Literal["float16", "float32"] = Field(
        "float16", description="the value store of the cached features: float32 keeps them exactly (as the reference's "
        "index holds them), at twice the disk: 13.5 GB against 6.7 GB for the ~3.3M ImageBind-Huge features of CC3M"
    )  # fmt: skip
    cache_k: int = Field(10, gt=0)
    cache_t: float = Field(20.0, gt=0)
    cache_weight: float = Field(0.5, ge=0.0, le=1.0)


class ModelConfig(Section):
    """Encoders and language model: presets for what is built, paths for what is loaded."""

    imagebind: Literal["huge", "base", "tiny"] = "tiny"
    imagebind_checkpoint: str | None = Field(None, description="imagebind_huge.pth (or .safetensors) as released")
    imagebind_vocab: str | None = Field(None, description="CLIP BPE vocabulary, bpe_simple_vocab_16e6.txt.gz")
    point_checkpoint: str | None = Field(
        None, description="imagebind_w3D.pth (Point-Bind): its 3D point branch is loaded beside imagebind_checkpoint "
        "for point-cloud inputs"
    )  # fmt: skip
    point_normalize: bool = Field(
        False, description="centre each point cloud and scale it into the unit sphere (Point-Bind's training data; "
        "ImageBind-LLM's inference does not)"
    )  # fmt: skip
    point_resample: int | None = Field(
        None, gt=0, description="resample each point cloud to this many points (Point-BERT's clouds have 8192); "
        "none: as given"
    )  # fmt: skip
    detector: str | None = Field(
        None, description="`generate --ground`: a transformers OWLv2 or Grounding DINO folder (e.g. "
        "google/owlv2-base-patch16-ensemble, downloaded beforehand)"
    )  # fmt: skip
    noun_parser: str | None = Field(
        None, description="`generate --ground`: an installed spaCy pipeline (e.g. en_core_web_sm) whose noun chunks "
        "are the phrases to find; none: the built-in rules"
    )  # fmt: skip
    llama: Literal["7B", "tiny"] = "tiny"
    llama_path: str | None = None
    tokenizer_path: str | None = None
    adapter_checkpoint: str | None = None
    lora_rank: int = Field(16, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    max_seq_len: int = Field(512, gt=0)
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="extraction and generate refuse an image (or video frames) with more pixels, "
        "from its header, before decoding it; PIL's decompression-bomb limit by default (PIL itself refuses above "
        "twice that)"
    )  # fmt: skip

    @field_validator("imagebind_checkpoint", "imagebind_vocab", "point_checkpoint", "detector", "llama_path",
                     "tokenizer_path", "adapter_checkpoint")  # fmt: skip
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
        "PACK", description="Ray Train's placement of the workers: PACK fills a node first; STRICT_SPREAD puts each "
        "worker on a node of its own"
    )  # fmt: skip
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
                raise ValueError("first_turn_only: true (deprecated: it means conversation: first) conflicts with "
                                 "conversation: whole; keep one of them")  # fmt: skip
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
        HELD_OUT_METRIC, description="the yardstick: heldout_caption_loss (the frozen held-out captions' "
        "loss, lower is better) or a benchmark's score on metric_data (higher is better): mme (perception + "
        "cognition), mme:<subtask|perception|cognition>, vqa (accuracy), captions (CIDEr-D)"
    )  # fmt: skip
    metric_data: str | None = Field(None, description="the benchmark's folder or file, for a benchmark metric")
    local: bool = Field(False, description="train in this process with one worker instead of Ray Train (small runs)")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        name, _, part = metric.partition(":")
        if metric == HELD_OUT_METRIC or (name in LLM_BENCHMARKS and not part):
            return metric
        if name == "mme" and part in (*SUBTASKS, "perception", "cognition"):
            return metric
        if name in ZERO_SHOT:
            raise ValueError(f"{metric} checks the frozen encoder, the same for every candidate: it cannot choose "
                             "between models")  # fmt: skip
        raise ValueError(f"unknown metric {metric!r}: heldout_caption_loss, mme[:<subtask|perception|cognition>], "
                         "vqa or captions")  # fmt: skip

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


class RayConfig(Section):
    """Where Ray runs: a local instance by default, an existing cluster with an address."""

    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)


class InferConfig(Section):
    """Generation defaults (those of the reference)."""

    temperature: float = Field(0.1, ge=0)
    top_p: float = Field(0.75, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    use_cache: bool = False


class ServeConfig(Section):
    """`ibllm serve`: where it listens, how many requests it decodes and holds, what one request may send."""

    host: str = Field("127.0.0.1", description="the address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535)
    slots: int = Field(16, gt=0, description="requests decoded together (the engine's KV-cache slots)")
    max_queue: int = Field(64, gt=0, description="requests held (decoding or waiting) before answering 429")
    max_body_mb: float = Field(32, gt=0)
    max_media_mb: float = Field(16, gt=0, description="one media part, decoded")
    timeout_s: float = Field(300, gt=0, description="the longest a request may wait for its next token")
    media_root: str | None = Field(None, description="server-side media paths are read only under this folder")
    cache: bool = Field(False, description="load the visual cache (a request's `cache` field turns it on or off)")
    replicas: int = Field(1, gt=0, description="Ray Serve replicas (serve --ray)")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs of each Ray Serve replica")


class ImagineConfig(Section):
    """`ibllm imagine`: Stable unCLIP drawing images from (cache-mixed) ImageBind embeddings (the apps extra)."""

    generator: str | None = Field(
        None, description="a local diffusers folder of stabilityai/stable-diffusion-2-1-unclip (ViT-H: the 1024-d "
        "embeddings of ImageBind-Huge), downloaded beforehand: nothing is downloaded at run time"
    )  # fmt: skip
    embedding_norm: float | None = Field(
        None, gt=0, description="the length the unit ImageBind embedding is scaled to for unCLIP (whose OpenCLIP "
        "embeddings are not normalised); null: sqrt(sum(mean^2 + std^2)) of the generator's image_normalizer"
    )  # fmt: skip
    steps: int = Field(20, gt=0, description="denoising steps")
    guidance: float = Field(10.0, ge=0, description="classifier-free guidance scale (on above 1); diffusers' default")
    noise_level: int = Field(0, ge=0, le=999, description="noise added to the embedding first (more: more variety)")
    size: int | None = Field(None, gt=0, multiple_of=8, description="pixels per side; null: the generator's own")
    images: int = Field(1, gt=0, description="images per request")
    batch: int = Field(4, gt=0, description="requests denoised together")

    @field_validator("generator")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute(value) if value else value


class Config(Section):
    """The root configuration."""

    workspace: str = Field(
        "workspace", validate_default=True, description="a local folder (made absolute at load) or an fsspec URL"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of the workspace")
    seed: int = 0
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    imagine: ImagineConfig = Field(default_factory=ImagineConfig)

    _absolute_workspace = field_validator("workspace")(absolute)

    @model_validator(mode="after")
    def _unique_sources(self) -> Config:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self

    def summary(self) -> str:
        """The configuration as YAML, every default spelled out (what `ibllm config` prints)."""
        return dump_config(self).rstrip("\n")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Load a YAML file (the packaged demo config when None) and apply `section.key=value` overrides."""
        return load_config(path, overrides)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the dotted field path."""


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `origin: dotted.path: message (got value)`."""
    lines = []
    for e in err.errors():
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"{origin}: {_dotted(e['loc'])}: {e['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _read_yaml(path: str | Path | None) -> tuple[dict[str, Any], str]:
    if path is None:
        text = resources.files("configs").joinpath(DEMO_CONFIG).read_text()
        origin = f"configs/{DEMO_CONFIG} (packaged default)"
    else:
        text, origin = _find_config(Path(path))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    return data, origin


def packaged_configs() -> list[str]:
    """Names of the configurations shipped with ibllm (`-c paper` takes configs/paper.yaml from anywhere)."""
    return sorted(
        f.name.removesuffix(".yaml") for f in resources.files("configs").iterdir() if f.name.endswith(".yaml")
    )


def _find_config(path: Path) -> tuple[str, str]:
    """A config file by path, else a packaged one by name (`paper`, `paper.yaml` or `configs/paper.yaml`)."""
    if path.is_file():
        return path.read_text(), str(path)
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if (len(path.parts) == 1 or path.parent.name == "configs") and name in packaged_configs():
        return resources.files("configs").joinpath(f"{name}.yaml").read_text(), f"configs/{name}.yaml (packaged)"
    raise ConfigError(f"{path}: config file not found (looked for {path.absolute()}, and among the packaged "
                      f"configs: {', '.join(packaged_configs())})")  # fmt: skip


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in nested data; the value is parsed as YAML; list items by index or by `name`."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            idx = _list_index(node, part, override)
            if last:
                node[idx] = yaml.safe_load(raw)
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {override!r}: {where} is a value, not a section")


def _list_index(items: list[Any], part: str, override: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"--set {override!r}: no list item {part!r} (use an index or an item's name)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config; raise ConfigError naming the file and field on any problem."""
    data, origin = _read_yaml(path)
    return _validate(data, origin, overrides)


def resolve_config(config: Config | str | Path | None, overrides: list[str] | None = None) -> Config:
    """A config given as an object, a YAML path, or None (the packaged demo config), with overrides applied."""
    if isinstance(config, Config):
        return _validate(config.model_dump(mode="json"), "config", overrides)
    return load_config(config, overrides)


def _validate(data: dict[str, Any], origin: str, overrides: list[str] | None) -> Config:
    for override in overrides or []:
        apply_override(data, override)
    if overrides:
        origin = f"{origin} with --set {' --set '.join(overrides)}"
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None


def dump_config(cfg: Config) -> str:
    """The config as YAML, every default spelled out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
