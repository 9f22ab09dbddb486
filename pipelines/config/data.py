"""Config sections of the data stages: the synthetic source, sources and filters, curate, download, extract, index."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.base import SOURCE_NAME, Section
from pipelines.config.networks import networks
from pipelines.paths import absolute_paths
from stores.metadata import CAPTION_MAX_CHARS


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
        CAPTION_MAX_CHARS,
        gt=0,
        description="captions are cut to this many characters (control characters become "
        "spaces) at ingest and when extraction reads a shard",
    )


DEADLINE_FACTOR = 3  # download.deadline, when unset, is this many timeouts


class DownloadConfig(Section):
    """img2dataset settings."""

    image_size: int = Field(256, ge=32)
    resize_mode: Literal["keep_ratio", "center_crop"] = "keep_ratio"
    processes: int = Field(2, gt=0)
    threads: int = Field(16, gt=0)
    timeout: float = Field(2.0, gt=0, description="seconds per connect and per read")
    deadline: float | None = Field(
        None,
        gt=0,
        description="seconds per sample from its first byte asked to its last, retries included; a "
        "slower answer (a drip) is cut off as a timeout. Default (null): 3 x timeout",
    )
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
        False,
        description="fetch from non-public addresses (loopback, private, link-local, multicast, reserved, "
        "unspecified; IPv4 and IPv6): false refuses them as `blocked_address` (the default: a URL list cannot make "
        "the downloader reach the local network), true allows them all (the demo's loopback server), a list of CIDR "
        "networks allows those only, e.g. [10.1.0.0/16]; checked on every connection, redirects included",
    )

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
        default_factory=dict,
        description="custom Ray resources each encoder actor also needs: a node label such "
        "as {encoder_node: 1} keeps the actors on the nodes that offer it (one per unit offered)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="bf16 on GPU when auto; on a GPU a half dtype casts the frozen weights to it, on the CPU "
        "it runs as autocast over float32 weights",
    )
    fp8: bool = Field(
        False,
        description="FP8 linear layers in the vision trunk (GPUs of compute capability >= 8.9, bfloat16, the "
        "fp8 extra: torchao); it changes the features, so it is one of the feature set's settings",
    )
    buffer_mb: int | None = Field(
        512,
        gt=0,
        description="object store memory Ray Data may fill with decoded samples waiting for the encoder "
        "(a soft limit across the cluster; null: Ray's default share of the object store)",
    )
    prefetch_batches: int = Field(
        0,
        ge=0,
        description="encoded blocks the driver fetches ahead; each one delays its shard's commit, so the "
        "default 0 commits a shard as soon as it is encoded (the actors never wait on the driver)",
    )


class IndexConfig(Section):
    """The visual cache: an autofaiss index over one feature source, and the mixing defaults."""

    name: str = Field("cache", pattern=r"^[a-z0-9][a-z0-9_-]*$")
    source: str = "cc3m"
    max_index_memory: str = Field("4G", pattern=r"^\d+(\.\d+)?[KMG]$", description="autofaiss's index budget")
    max_query_ms: float = Field(10.0, gt=0)
    index_key: str | None = Field(
        None,
        description="a fixed faiss index key; default: IVF + 4-bit fast-scan PQ sized to the budget, or "
        "autofaiss's choice for sets up to 100k vectors whose flat index fits",
    )
    index_param: str | None = Field(None, description="first search parameters of index_key (e.g. nprobe=16)")
    rescore: int = Field(8, ge=1, description="candidates per neighbour re-scored exactly (tuning may raise it)")
    holdout: int = Field(500, gt=0, description="held-out queries for the recall@10 in meta.json")
    target_recall: float = Field(0.95, gt=0, le=1, description="nprobe and re-scoring rise until recall@10 is this")
    use_gpu: bool = Field(False, description="search with faiss-gpu (the gpu extra) when a GPU is present")
    values: Literal["float16", "float32"] = Field(
        "float16",
        description="the value store of the cached features: float32 keeps them exactly (as the reference's "
        "index holds them), at twice the disk: 13.5 GB against 6.7 GB for the ~3.3M ImageBind-Huge features of CC3M",
    )
    cache_k: int = Field(10, gt=0)
    cache_t: float = Field(20.0, gt=0)
    cache_weight: float = Field(0.5, ge=0.0, le=1.0)
