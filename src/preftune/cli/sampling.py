"""``preftune online`` and ``preftune ppo``: the commands that sample from the policy as it trains."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from .flags import add_key_flags, load_run, record


def add_sampling_commands(commands: Any, keys_help: str) -> None:
    """Register ``online`` and ``ppo`` on the CLI's subcommands."""
    online = _sampling_parser(
        commands,
        "online",
        "online DPO: sample from the policy, score with a reward model, pair, train; repeat",
        "objective/train/rollout/online/prompts/reward",
        keys_help,
    )
    record(
        online,
        "--loss",
        key="objective.loss",
        shape=_names,
        help="objective name(s), comma-separated (default dpo)",
    )
    record(
        online, "--rounds", key="online.rounds", help="rounds of sample -> score -> pair -> train (default 3)"
    )
    record(
        online,
        "--samples-per-prompt",
        key="online.samples_per_prompt",
        metavar="K",
        help="completions per prompt (default 4)",
    )
    add_key_flags(online, "online")
    online.set_defaults(run=_online)

    ppo = _sampling_parser(
        commands,
        "ppo",
        "PPO with a KL penalty: sample, score with a reward model or function, update policy and critic",
        "train/rollout/ppo/prompts/reward",
        keys_help,
    )
    record(ppo, "--kl-coef", key="ppo.kl_coef", help="β of the per-token KL penalty (default 0.05)")
    record(ppo, "--steps", key="ppo.steps", help="PPO steps: rollout batches (default 100)")
    add_key_flags(ppo, "ppo")
    ppo.set_defaults(run=_ppo)


def _sampling_parser(
    commands: Any, name: str, description: str, sections: str, keys_help: str
) -> argparse.ArgumentParser:
    """A command that samples from the policy as it trains (``online``, ``ppo``): its common flags."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=description, epilog=f"{keys_help} (sections {sections.replace('/', ', ')})"
    )
    record(
        parser,
        "--model",
        key="model.name_or_path",
        help="the starting policy: hub name or local folder of a causal LM",
    )
    record(
        parser, "--prompts", key="prompts.path", help="prompts: any file train reads, with a 'prompt' field"
    )
    record(
        parser,
        "--reward",
        key="reward.scorer",
        help="a reward-model or ensemble folder, or a function module:function / file.py:function",
    )
    record(
        parser,
        "--monitor-reward",
        key="reward.monitor",
        metavar="SCORER",
        help="a second reward that scores the same samples, never trained on: warns on overoptimization",
    )
    record(parser, "--output", key="train.output_dir", help="output folder (train.output_dir)")
    parser.add_argument("--config", help=f"YAML file with model/{sections} sections")
    record(parser, "--set", key="", metavar="SECTION.KEY=VALUE", help="override a config value")
    record(
        parser,
        "--resume",
        key="train.resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue from where the run in --output stopped (ppo: or from the checkpoint named)",
    )
    return parser


def _sampling_config(args: argparse.Namespace, command: str) -> RunConfig:
    """``online`` and ``ppo``: the config file, then every flag in command-line order."""
    config = load_run(args, command)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required (--model PATH_OR_NAME)")
    return config


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _online(args: argparse.Namespace) -> None:
    from ..recipes.online import train_online

    train_online(_sampling_config(args, "online"))


def _ppo(args: argparse.Namespace) -> None:
    from ..recipes.ppo import train_ppo

    train_ppo(_sampling_config(args, "ppo"))
