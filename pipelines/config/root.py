"""The root configuration: the workspace, the seed and one section per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from pipelines.config.base import Section
from pipelines.config.data import (
    CurateConfig,
    DownloadConfig,
    ExtractConfig,
    IndexConfig,
    SourceConfig,
    SyntheticConfig,
)
from pipelines.config.serving import ImagineConfig, InferConfig, RayConfig, ServeConfig
from pipelines.config.training import ModelConfig, RetrainConfig, TrainConfig
from pipelines.paths import absolute


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

    @model_validator(mode="before")
    @classmethod
    def _serve_cache(cls, data: Any) -> Any:
        # `serve.cache` (before infer.use_cache was every command's cache setting) still means infer.use_cache.
        serve = data.get("serve") if isinstance(data, dict) else None
        if isinstance(serve, dict) and "cache" in serve:
            serve, infer = dict(serve), dict(data.get("infer") or {})
            infer.setdefault("use_cache", serve.pop("cache"))
            data = {**data, "serve": serve, "infer": infer}
        return data

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
        from pipelines.config.loading import load_config

        return load_config(path, overrides)


def dump_config(cfg: Config) -> str:
    """The config as YAML, every default spelled out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
