"""Configuration: YAML + key=value overrides -> typed, validated argument groups."""

from prefalign.config.args import (
    DataArguments,
    FinetuningArguments,
    ModelArguments,
    RunConfig,
)
from prefalign.config.loader import (
    build_config,
    load_config,
    parse_overrides,
)

__all__ = [
    "DataArguments", "FinetuningArguments", "ModelArguments", "RunConfig",
    "build_config", "load_config", "parse_overrides",
]
