"""The whole run configuration: its sections, YAML files, ``--set section.key=value`` overrides,
validation.

Types are checked while a config is built (:func:`load_config`), ranges and cross-field rules by
:func:`validate`, which every recipe calls first, so a config built in Python is checked exactly
like one read from YAML. With ``command``, a key that command does not read is refused
(:mod:`.commands`). Rules that need the objective registry (names, which parameters an objective
uses) live with the registry (:func:`preftune.losses.build_objective`). Unknown keys get a
did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .coerce import build
from .commands import check_command_keys
from .objective import ObjectiveConfig, check_objective
from .rl import OnlineConfig, PPOConfig, RolloutConfig, check_online, check_ppo, check_rollout
from .sections import (
    DataConfig,
    ModelConfig,
    PromptsConfig,
    ReferenceConfig,
    RewardConfig,
    RMConfig,
    TrainConfig,
    check_data,
    check_model,
    check_reference,
    check_rm,
    check_sampling,
    check_train,
)
from .yamlfile import read_yaml

__all__ = ["RunConfig", "load_config", "validate"]

SECTIONS = (
    "model",
    "data",
    "objective",
    "reference",
    "train",
    "rm",
    "prompts",
    "reward",
    "rollout",
    "online",
    "ppo",
)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# --------------------------------------------------------------------------- building


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, str]:
    """``section.key=value``; the value stays text until :mod:`preftune.config.coerce` parses it by the key's type."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected section.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), raw.strip()


def load_config(
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    base: dict[str, Any] | None = None,
    command: str | None = None,
) -> RunConfig:
    """Build and validate a :class:`RunConfig` from defaults, a YAML file, a dict and overrides;
    with ``command`` (``train``, ``sft``, ``rm train``, …), refuse a key that command does not read."""
    tree: dict[str, Any] = {}
    if path is not None:
        loaded, _ = read_yaml(path, "config file")
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for section, value in loaded.items():
            if section in SECTIONS and value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}: {section}: expected a section (mapping), got {value!r}")
        tree = loaded
    for dotted, value in (base or {}).items():
        _set_dotted(tree, dotted, value)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    config = build(RunConfig, tree, "")
    if command is not None:
        check_command_keys(tree, command)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Ranges and cross-field rules of every section. Raises :class:`ConfigError` naming the key."""
    check_model(config.model)
    check_data(config.data)
    check_reference(config.reference, config.model)
    check_train(config.train)
    check_objective(config.objective)
    check_rm(config.rm)
    check_sampling(config.prompts, config.reward)
    check_rollout(config.rollout)
    check_online(config.online)
    check_ppo(config.ppo)


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
