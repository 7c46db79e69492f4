"""``preftune online`` and ``preftune ppo``: the commands that sample from the policy as it trains."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import RunConfig, load_config
from ..errors import ConfigError


def add_sampling_commands(commands: Any, keys_help: str) -> None:
    """Register ``online`` and ``ppo`` on the CLI's subcommands."""
    online = _sampling_parser(
        commands,
        "online",
        "online DPO: sample from the policy, score with a reward model, pair, train; repeat",
        "objective/train/rollout/online/prompts/reward",
        keys_help,
    )
    online.add_argument("--loss", help="objective name(s), comma-separated (default dpo)")
    online.add_argument("--rounds", type=int, help="rounds of sample -> score -> pair -> train (default 3)")
    online.add_argument(
        "--samples-per-prompt", type=int, metavar="K", help="completions per prompt (default 4)"
    )
    online.set_defaults(run=_online)

    ppo = _sampling_parser(
        commands,
        "ppo",
        "PPO with a KL penalty: sample, score with a reward model or function, update policy and critic",
        "train/rollout/ppo/prompts/reward",
        keys_help,
    )
    ppo.add_argument("--kl-coef", type=float, help="β of the per-token KL penalty (default 0.05)")
    ppo.add_argument("--steps", type=int, help="PPO steps: rollout batches (default 100)")
    ppo.set_defaults(run=_ppo)


def _sampling_parser(
    commands: Any, name: str, description: str, sections: str, keys_help: str
) -> argparse.ArgumentParser:
    """A command that samples from the policy as it trains (``online``, ``ppo``): its common flags."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=description, epilog=f"{keys_help} (sections {sections.replace('/', ', ')})"
    )
    parser.add_argument("--model", help="the starting policy: hub name or local folder of a causal LM")
    parser.add_argument("--prompts", help="prompts: any file train reads, with a 'prompt' field")
    parser.add_argument(
        "--reward",
        help="a reward-model or ensemble folder, or a function module:function / file.py:function",
    )
    parser.add_argument(
        "--monitor-reward",
        metavar="SCORER",
        help="a second reward that scores the same samples, never trained on: warns on overoptimization",
    )
    parser.add_argument("--output", help="output folder (train.output_dir)")
    parser.add_argument("--config", help=f"YAML file with model/{sections} sections")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument(
        "--resume", action="store_true", help="continue from where the run in --output stopped"
    )
    return parser


def _sampling_config(args: argparse.Namespace, section: str, flags: dict[str, str]) -> RunConfig:
    """``online`` and ``ppo``: the config file, then the flags (``flags`` maps each to its key), then --set."""
    base: dict[str, object] = {}
    keys = {"model": "model.name_or_path", "prompts": "prompts.path", "reward": "reward.scorer"}
    keys["monitor_reward"] = "reward.monitor"
    for flag, key in (keys | flags | {"output": "train.output_dir"}).items():
        if getattr(args, flag, None) is not None:
            base[key] = getattr(args, flag)
    if getattr(args, "loss", None):
        base["objective.loss"] = [name for name in args.loss.split(",") if name]
    if args.resume:
        base["train.resume"] = True
    config = load_config(args.config, args.set or (), base, command=section)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required (--model PATH_OR_NAME)")
    return config


def _online(args: argparse.Namespace) -> None:
    from ..recipes.online import train_online

    flags = {"rounds": "online.rounds", "samples_per_prompt": "online.samples_per_prompt"}
    train_online(_sampling_config(args, "online", flags))


def _ppo(args: argparse.Namespace) -> None:
    from ..recipes.ppo import train_ppo

    train_ppo(_sampling_config(args, "ppo", {"kl_coef": "ppo.kl_coef", "steps": "ppo.steps"}))
