"""Typed configuration, the ground floor: sections, YAML and ``--set``, validation, which command
reads which key. Imports nothing of preftune but its errors."""

from ..errors import ConfigError
from .commands import COMMANDS, check_command_keys, readers
from .load import SECTIONS, RunConfig, load_config, parse_override, to_dict, validate
from .objective import ObjectiveConfig, check_objective
from .rl import PAIR_RULES, OnlineConfig, PPOConfig, RolloutConfig
from .sections import (
    TRACKERS,
    DataConfig,
    ModelConfig,
    PromptsConfig,
    ReferenceConfig,
    RewardConfig,
    RMConfig,
    TrainConfig,
    looks_like_template,
    read_template,
)

__all__ = [
    "COMMANDS",
    "PAIR_RULES",
    "SECTIONS",
    "TRACKERS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OnlineConfig",
    "PPOConfig",
    "PromptsConfig",
    "RMConfig",
    "ReferenceConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TrainConfig",
    "check_command_keys",
    "check_objective",
    "load_config",
    "looks_like_template",
    "parse_override",
    "read_template",
    "readers",
    "to_dict",
    "validate",
]
