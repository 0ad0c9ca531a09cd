"""Configuration: pydantic models, the layered YAML loader, and the module that reads env vars."""

from pipeline.config.loader import config_hash, load_config, manifest_config
from pipeline.config.models import (
    AuthConfig,
    CleanPixelsConfig,
    ComputeConfig,
    CrawlConfig,
    DeidConfig,
    InferConfig,
    LimitsConfig,
    LoggingConfig,
    PipelineConfig,
    ReviewConfig,
    ReviewUser,
    RunConfig,
    SourceConfig,
    SynthConfig,
    TensorsConfig,
    WritebackConfig,
)

__all__ = [
    "AuthConfig",
    "CleanPixelsConfig",
    "ComputeConfig",
    "CrawlConfig",
    "DeidConfig",
    "InferConfig",
    "LimitsConfig",
    "LoggingConfig",
    "PipelineConfig",
    "ReviewConfig",
    "ReviewUser",
    "RunConfig",
    "SourceConfig",
    "SynthConfig",
    "TensorsConfig",
    "WritebackConfig",
    "config_hash",
    "load_config",
    "manifest_config",
]
