"""Typed configuration: one root model with a section per stage, loaded from YAML with dotted overrides."""

from pipelines.config.base import DEMO_CONFIG, SOURCE_NAME, Conversation, Section
from pipelines.config.data import (
    CurateConfig,
    DownloadConfig,
    ExtractConfig,
    FilterConfig,
    IndexConfig,
    SourceConfig,
    SyntheticConfig,
)
from pipelines.config.loading import (
    ConfigError,
    apply_override,
    format_validation_error,
    load_config,
    packaged_configs,
    resolve_config,
    set_value,
    with_settings,
)
from pipelines.config.root import Config, dump_config
from pipelines.config.serving import ImagineConfig, InferConfig, RayConfig, ServeConfig
from pipelines.config.training import BaseLMConfig, ModelConfig, RetrainConfig, StageConfig, TrainConfig

__all__ = [
    "DEMO_CONFIG",
    "SOURCE_NAME",
    "BaseLMConfig",
    "Config",
    "ConfigError",
    "Conversation",
    "CurateConfig",
    "DownloadConfig",
    "ExtractConfig",
    "FilterConfig",
    "ImagineConfig",
    "IndexConfig",
    "InferConfig",
    "ModelConfig",
    "RayConfig",
    "RetrainConfig",
    "Section",
    "ServeConfig",
    "SourceConfig",
    "StageConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_override",
    "dump_config",
    "format_validation_error",
    "load_config",
    "packaged_configs",
    "resolve_config",
    "set_value",
    "with_settings",
]
