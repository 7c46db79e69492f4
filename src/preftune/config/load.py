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
import warnings
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
from .translate import ForeignReader
from .yamlfile import read_yaml as read_document

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


Override = str | tuple[str, Any]
"""``"section.key=value"`` (``--set``), or ``(key, value)`` from a flag: ``("train.seed", "3")``,
or a TRL / LLaMA-Factory name without a section, ``("learning_rate", "1e-6")``."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping: preftune's sections, or a flat TRL / LLaMA-Factory file (read
    strictly: a key written twice or an alias bomb is refused, naming the file and line)."""
    loaded, _ = read_document(path, "config file")
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    for section, value in loaded.items():
        if section in SECTIONS and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: {section}: expected a section (mapping), got {value!r}")
    return loaded


def load_config(
    path: str | Path | None = None,
    overrides: typing.Iterable[Override] = (),
    base: dict[str, Any] | None = None,
    command: str | None = None,
    notices: list[str] | None = None,
) -> RunConfig:
    """Build and validate a :class:`RunConfig`: preftune's defaults, then the YAML file (preftune's
    sections, or a flat TRL or LLaMA-Factory file read with that tool's defaults), then ``base``,
    then ``overrides`` in order (later ones win). With ``command`` (``train``, ``sft``, ``rm
    train``, …), a key that command does not read is refused. What each TRL or LLaMA-Factory name
    became is appended to ``notices`` (or warned, without a list)."""
    said: list[str] = [] if notices is None else notices
    tree = config_tree(path, overrides, base, command, said)
    if notices is None:
        for line in said:
            warnings.warn(line, stacklevel=2)
    config = build(RunConfig, tree, "")
    if command is not None:
        check_command_keys(tree, command)
    validate(config)
    return config


def config_tree(
    path: str | Path | None,
    overrides: typing.Iterable[Override],
    base: dict[str, Any] | None,
    command: str | None,
    notices: list[str],
) -> dict[str, Any]:
    """The nested keys a run sets, every layer applied in precedence order, foreign names
    translated (:mod:`.foreign`), but not yet typed or checked."""
    loaded = read_yaml(path) if path is not None else {}
    own = {k: v for k, v in loaded.items() if k in SECTIONS}
    flat = {k: v for k, v in loaded.items() if k not in SECTIONS}
    items = [parse_override(item) if isinstance(item, str) else item for item in overrides]
    flagged = {key: value for key, value in items if _foreign(key)}
    tree: dict[str, Any] = {}
    reader = ForeignReader(flat, flagged, command, notices) if flat or flagged else None
    if reader is not None:
        for key, value in reader.file_settings():
            _set_dotted(tree, key, value)
    for section, values in own.items():
        for key, value in (values or {}).items():
            _set_dotted(tree, f"{section}.{key}", value)
        tree.setdefault(section, {})
    for dotted, value in (base or {}).items():
        _set_dotted(tree, dotted, value)
    for key, value in items:
        if not _foreign(key):
            _set_dotted(tree, key, value)
        else:
            assert reader is not None
            for name, setting in reader.settings(key, value):
                _set_dotted(tree, name, setting)
    _eval_from_the_same_dataset(tree.get("data") or {})
    return tree


def _foreign(key: str) -> bool:
    """A TRL or LLaMA-Factory name: no section, and not a section's own name."""
    return "." not in key and key not in SECTIONS


def _eval_from_the_same_dataset(data: dict[str, Any]) -> None:
    """``data.eval_split`` alone evaluates that split of ``data.path``'s dataset, as TRL's scripts
    evaluate ``dataset_test_split``; a file has no other split to take."""
    if "eval_split" not in data or data.get("eval_path") or not data.get("path"):
        return
    if Path(str(data["path"])).expanduser().is_file():
        raise ConfigError(
            f"data.eval_split: {data['path']} is a file, which has no splits; name the held-out file in data.eval_path"
        )
    data["eval_path"] = data["path"]


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
