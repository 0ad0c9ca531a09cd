"""Configuration: pydantic models, the layered YAML loader, and the module that reads env vars."""

from pipeline.config.loader import config_hash, load_config
from pipeline.config.models import (
    AuthConfig,
    ComputeConfig,
    CrawlConfig,
    DeidConfig,
    InferConfig,
    LoggingConfig,
    PipelineConfig,
    SourceConfig,
    SynthConfig,
    TensorsConfig,
)

__all__ = [
    "AuthConfig",
    "ComputeConfig",
    "CrawlConfig",
    "DeidConfig",
    "InferConfig",
    "LoggingConfig",
    "PipelineConfig",
    "SourceConfig",
    "SynthConfig",
    "TensorsConfig",
    "config_hash",
    "load_config",
]
