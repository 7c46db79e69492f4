"""Which command reads which config keys: a key that the command would ignore is refused.

``preftune sft --set ppo.kl_coef=0.3`` would otherwise be taken and silently do nothing, and a
knob silently ignored is a wasted run. Each command declares the sections it reads; a few keys of
the shared ``data`` section are read by some of those commands only. The same table gives each
command's ``--help`` its sections.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

COMMANDS: dict[str, tuple[str, ...]] = {
    "train": ("model", "data", "objective", "reference", "train"),
    "sft": ("model", "data", "train"),
    "rm train": ("model", "data", "train", "rm"),
    "online": ("model", "data", "objective", "reference", "train", "rollout", "online", "prompts", "reward"),
    "ppo": ("model", "data", "reference", "train", "rollout", "ppo", "prompts", "reward"),
    "eval": ("model", "data", "reward"),
    "check-data": ("model", "data", "objective", "rm"),
}
"""The sections each command reads (the pipeline's stage kinds are these commands)."""

_PAIRS = ("train", "rm train", "eval", "check-data")
_TRAINED_ON_DATA = ("train", "sft", "rm train", "check-data")
_SAMPLING = ("online", "ppo")
KEY_READERS: dict[str, tuple[str, ...]] = {
    "data.path": _TRAINED_ON_DATA,
    "data.split": (*_TRAINED_ON_DATA, "eval"),  # eval reads its sets from this split of a hub dataset
    "data.eval_path": ("train", "sft", "rm train", "check-data"),
    "data.eval_split": ("train", "sft", "rm train", "check-data"),
    "data.chosen_field": _PAIRS,
    "data.rejected_field": _PAIRS,
    "data.identical_pairs": _PAIRS,
    "data.layout": (*_PAIRS, "online"),
    "data.pack_tokens": (*_PAIRS, "online"),
    "data.completion_field": ("train", "sft", "check-data"),
    "data.label_field": ("train", "check-data"),
    "data.messages_field": ("sft", "check-data"),
    "data.text_field": ("sft", "check-data"),
    "data.completion_only_loss": ("sft",),
    "data.empty_completions": (*_TRAINED_ON_DATA, "eval"),
    "data.template_mismatch": (*_TRAINED_ON_DATA, "eval"),
    "data.missing_eos": (*_TRAINED_ON_DATA, "eval"),
    "data.response_fields": _PAIRS,
    "data.preference_field": _PAIRS,
    "data.preference_values": _PAIRS,
    "data.score_fields": _PAIRS,
    "data.cache": ("train", "sft", "rm train", "eval"),
    "data.cache_dir": ("train", "sft", "rm train", "eval"),
    "data.num_proc": (*_TRAINED_ON_DATA, "eval"),
    "rm.ensemble": ("rm train",),
    "rm.ensemble_kind": ("rm train",),
    "rm.bootstrap": ("rm train",),
    # eval takes its reward as --reward-model / --reward; it reads how an ensemble's are aggregated.
    "reward.scorer": _SAMPLING,
    "reward.batch_size": _SAMPLING,
    "reward.monitor": _SAMPLING,
    "reward.monitor_patience": _SAMPLING,
    "reward.monitor_noise_z": _SAMPLING,
    "reward.stop_on_overoptimization": _SAMPLING,
}
"""Keys of a shared section that only some of the commands reading the section read."""


def readers(key: str) -> tuple[str, ...]:
    """The commands that read ``section.key``."""
    if key in KEY_READERS:
        return KEY_READERS[key]
    section = key.split(".", 1)[0]
    return tuple(command for command, sections in COMMANDS.items() if section in sections)


def reads(command: str, key: str) -> bool:
    return command in readers(key)


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"train": {"seed": 1}}`` -> ``["train.seed"]``; a section given as a whole counts as its name."""
    out: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and not prefix:
            out += dotted_keys(value, f"{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def check_command_keys(tree: dict[str, Any], command: str) -> None:
    """Refuse, in one line, the first key of ``tree`` that ``command`` does not read."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    for key in dotted_keys(tree):
        if "." not in key:  # an empty section: nothing set in it
            continue
        if not reads(command, key):
            users = readers(key)
            by = ", ".join(f"'preftune {c}'" for c in users) or "no command"
            raise ConfigError(f"{key} is read by {by}, not by 'preftune {command}'")
