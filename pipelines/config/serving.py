"""Config sections of Ray, inference, serving and the applications."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipelines.config.base import Section
from pipelines.paths import absolute


class RayConfig(Section):
    """Where Ray runs: a local instance by default, an existing cluster with an address."""

    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)


class InferConfig(Section):
    """How a trained model answers in generate, chat, serve, imagine and the benchmarks: which checkpoint, on what
    device, with or without the visual cache, and the sampling of a request that sets none (the reference's)."""

    checkpoint: str | None = Field(
        None,
        description="our checkpoint folder (a run's folder stands for its newest checkpoint, a stage's for "
        "its newest complete run's), looked for from the current folder, then inside the workspace; null: the "
        "promoted model, else the newest complete stage-2 run, else stage-1's (evaluate: the --stage's newest)",
    )
    use_cache: bool = Field(False, description="mix in the visual cache built by `ibllm index` (index.name)")
    device: str = Field("auto", description="auto (a GPU when present), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="of the language model and encoder (auto: bfloat16 on a GPU, float32 on the CPU)"
    )
    batch: int = Field(16, gt=0, description="requests (or benchmark questions) decoded together")
    temperature: float = Field(0.1, ge=0, description="sampling temperature, 0 = greedy")
    top_p: float = Field(0.75, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(256, gt=0, description="longest answer in tokens")


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
    replicas: int = Field(1, gt=0, description="Ray Serve replicas (serve --ray)")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs of each Ray Serve replica")


class ImagineConfig(Section):
    """`ibllm imagine`: Stable unCLIP drawing images from (cache-mixed) ImageBind embeddings (the apps extra)."""

    generator: str | None = Field(
        None,
        description="a local diffusers folder of stabilityai/stable-diffusion-2-1-unclip (ViT-H: the 1024-d "
        "embeddings of ImageBind-Huge), downloaded beforehand: nothing is downloaded at run time",
    )
    embedding_norm: float | None = Field(
        None,
        gt=0,
        description="the length the unit ImageBind embedding is scaled to for unCLIP (whose OpenCLIP "
        "embeddings are not normalised); null: sqrt(sum(mean^2 + std^2)) of the generator's image_normalizer",
    )
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
