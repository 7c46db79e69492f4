"""``preftune train | sft | rm train | rm score``: the commands that train on a data file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..errors import ConfigError
from ..generation.aggregate import AGGREGATES


def _run_config(args: argparse.Namespace, command: str) -> RunConfig:
    """The config file, then --model/--data/… , then --set: later ones win."""
    base: dict[str, object] = {}
    if args.model:
        base["model.name_or_path"] = args.model
    if args.data:
        base["data.path"] = args.data
    if args.eval_data:
        base["data.eval_path"] = args.eval_data
    if getattr(args, "loss", None):
        base["objective.loss"] = [name for name in args.loss.split(",") if name]
    if args.output:
        base["train.output_dir"] = args.output
    if args.resume:
        base["train.resume"] = True
    if getattr(args, "ensemble", None) is not None:
        base["rm.ensemble"] = args.ensemble
    config = load_config(args.config, args.set or (), base, command=command)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required (--model PATH_OR_NAME)")
    if not config.data.path:
        raise ConfigError("data.path: required (--data FILE_OR_NAME)")
    return config


def _train(args: argparse.Namespace) -> None:
    from ..recipes.dpo import train

    train(_run_config(args, "train"))


def _sft(args: argparse.Namespace) -> None:
    from ..recipes.sft import train_sft

    train_sft(_run_config(args, "sft"))


def _rm_train(args: argparse.Namespace) -> None:
    from ..recipes.reward import train_reward_model

    train_reward_model(_run_config(args, "rm train"))


def _rm_score(args: argparse.Namespace) -> None:
    from ..config import DataConfig
    from ..generation.ensemble import EnsembleScorer, is_ensemble
    from ..generation.scoring import RewardModelScorer, Scorer, score_file

    scorer: Scorer
    if is_ensemble(args.model):
        scorer = EnsembleScorer(
            args.model, args.aggregate, args.uncertainty_penalty, batch_size=args.batch_size, progress=True
        )
    else:
        scorer = RewardModelScorer(args.model, batch_size=args.batch_size, progress=True)
    summary = score_file(scorer, args.data, Path(args.output), DataConfig())
    print(f"scored {summary['records']} records -> {args.output}")
    if summary["accuracy"] is not None:
        of = f" ({args.aggregate} of {summary['members']} members)" if "members" in summary else ""
        print(
            f"accuracy (chosen scored above rejected): {summary['accuracy']:.1%} of {summary['pairs']} pairs{of}"
        )
        for k, accuracy in enumerate(summary.get("member_accuracy", [])):
            print(f"  member {k:<17} {accuracy:.1%}")
        if set(summary["subsets"]) - {"all"}:
            for name, accuracy in summary["subsets"].items():
                print(f"  {name:24} {accuracy:.1%}")
    if summary.get("disagreement") is not None:
        print(
            f"members' disagreement (their standard deviation, mean over texts): {summary['disagreement']:.4f}"
        )


def _training_arguments(parser: argparse.ArgumentParser, model_help: str, with_loss: bool) -> None:
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--data", help="JSONL/JSON/CSV/Parquet file or hub dataset name")
    parser.add_argument(
        "--eval-data", help="held-out pairs, evaluated every train.eval_every steps and at the end"
    )
    if with_loss:
        parser.add_argument(
            "--loss",
            help="objective name(s), comma-separated: dpo, dpop, simpo, ipo, … (kto: unpaired examples)",
        )
    parser.add_argument("--output", help="output folder (train.output_dir)")
    parser.add_argument(
        "--config", help="YAML file with model/data/objective/reference/train/reward sections"
    )
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output"
    )


def add_training_commands(commands: Any, keys_help: str) -> None:
    """``train``, ``sft``, ``rm train``, ``rm score``."""
    train = commands.add_parser(
        "train",
        help="train a policy on preference pairs (DPO and its family) or unpaired examples (KTO)",
        epilog=keys_help,
    )
    _training_arguments(train, "hub name or local folder of a causal LM", with_loss=True)
    train.set_defaults(run=_train)

    sft = commands.add_parser(
        "sft", help="supervised fine-tuning on prompt/completion, messages or text records", epilog=keys_help
    )
    _training_arguments(sft, "hub name or local folder of a causal LM", with_loss=False)
    sft.set_defaults(run=_sft)

    rm = commands.add_parser("rm", help="Bradley–Terry reward models: train, score")
    rm_commands = rm.add_subparsers(dest="rm_command", required=True)
    rm_train = rm_commands.add_parser(
        "train", help="train a reward model on preference pairs", epilog=keys_help
    )
    _training_arguments(rm_train, "a causal LM (gets a new reward head) or a reward model", with_loss=False)
    rm_train.add_argument(
        "--ensemble", type=int, metavar="K", help="train K reward models saved as one folder (rm.ensemble)"
    )
    rm_train.set_defaults(run=_rm_train)
    rm_score = rm_commands.add_parser("score", help="score preference or (prompt, completion) records")
    rm_score.add_argument(
        "--model", required=True, help="reward-model or ensemble folder (rm train's OUTPUT/final)"
    )
    rm_score.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet records")
    rm_score.add_argument("--output", required=True, help="scores, one JSON object per record")
    rm_score.add_argument("--batch-size", type=int, default=16)
    rm_score.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="mean",
        help="an ensemble's members made one (default mean)",
    )
    rm_score.add_argument(
        "--uncertainty-penalty", type=float, default=1.0, metavar="λ", help="λ of --aggregate mean_minus_std"
    )
    rm_score.set_defaults(run=_rm_score)
