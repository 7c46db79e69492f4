"""``preftune train | sft | rm train | rm score``: the commands that train on a data file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from ..generation.aggregate import AGGREGATES
from .flags import add_foreign_flags, add_key_flags, load_run, record
from .llamafactory import llamafactory_records
from .values import positive_int


def _run_config(args: argparse.Namespace, command: str) -> RunConfig:
    """The config file (preftune's, TRL's or LLaMA-Factory's), then every flag in command-line order."""
    config = load_run(args, command)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required (--model PATH_OR_NAME)")
    if not config.data.path:
        raise ConfigError("data.path: required (--data FILE_OR_NAME)")
    return config


def _train(args: argparse.Namespace) -> None:
    from ..recipes.dpo import train

    config = _run_config(args, "train")
    train(config, **llamafactory_records(args, config, "train"))


def _sft(args: argparse.Namespace) -> None:
    from ..recipes.sft import train_sft

    config = _run_config(args, "sft")
    train_sft(config, **llamafactory_records(args, config, "sft"))


def _rm_train(args: argparse.Namespace) -> None:
    from ..recipes.reward import train_reward_model

    config = _run_config(args, "rm train")
    train_reward_model(config, **llamafactory_records(args, config, "rm train"))


def _rm_score(args: argparse.Namespace) -> None:
    from ..config import DataConfig
    from ..generation.ensemble import EnsembleScorer, is_ensemble
    from ..generation.scoring import RewardModelScorer, Scorer, check_scores_output, score_file
    from ..model.load import check_local_path

    check_scores_output(Path(args.output), args.data, args.model)
    check_local_path(args.model, "--model")
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


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _training_arguments(
    parser: argparse.ArgumentParser, command: str, model_help: str, with_loss: bool
) -> None:
    record(parser, "--model", key="model.name_or_path", help=model_help)
    record(
        parser,
        "--data",
        key="data.path",
        help="JSONL/JSON/CSV/Parquet file, hub dataset (name or name:config)",
    )
    record(
        parser,
        "--eval-data",
        key="data.eval_path",
        help="held-out pairs, evaluated every train.eval_every steps and at the end",
    )
    if with_loss:
        record(
            parser,
            "--loss",
            key="objective.loss",
            shape=_names,
            help="objective name(s), comma-separated: dpo, dpop, simpo, ipo, … (kto: unpaired examples)",
        )
    record(parser, "--output", key="train.output_dir", help="output folder (train.output_dir)")
    parser.add_argument(
        "--config", help="YAML file: preftune's sections, or a flat TRL or LLaMA-Factory config"
    )
    record(parser, "--set", key="", metavar="SECTION.KEY=VALUE", help="override a config value")
    record(
        parser,
        "--resume",
        key="train.resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output, or the one named",
    )
    add_key_flags(parser, command)
    add_foreign_flags(parser)


def add_training_commands(commands: Any, keys_help: str) -> None:
    """``train``, ``sft``, ``rm train``, ``rm score``."""
    keys_help = f"{keys_help}; TRL's and LLaMA-Factory's names are read too (docs/from-trl.md)"
    train = commands.add_parser(
        "train",
        help="train a policy on preference pairs (DPO and its family) or unpaired examples (KTO)",
        epilog=keys_help,
    )
    _training_arguments(train, "train", "hub name or local folder of a causal LM", with_loss=True)
    train.set_defaults(run=_train)

    sft = commands.add_parser(
        "sft", help="supervised fine-tuning on prompt/completion, messages or text records", epilog=keys_help
    )
    _training_arguments(sft, "sft", "hub name or local folder of a causal LM", with_loss=False)
    sft.set_defaults(run=_sft)

    rm = commands.add_parser("rm", help="Bradley–Terry reward models: train, score")
    rm_commands = rm.add_subparsers(dest="rm_command", required=True)
    rm_train = rm_commands.add_parser(
        "train", help="train a reward model on preference pairs", epilog=keys_help
    )
    _training_arguments(
        rm_train, "rm train", "a causal LM (gets a new reward head) or a reward model", with_loss=False
    )
    record(
        rm_train,
        "--ensemble",
        key="rm.ensemble",
        metavar="K",
        help="train K reward models saved as one folder (rm.ensemble)",
    )
    rm_train.set_defaults(run=_rm_train)
    rm_score = rm_commands.add_parser("score", help="score preference or (prompt, completion) records")
    rm_score.add_argument(
        "--model", required=True, help="reward-model or ensemble folder (rm train's OUTPUT/final)"
    )
    rm_score.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet records")
    rm_score.add_argument("--output", required=True, help="scores, one JSON object per record")
    rm_score.add_argument("--batch-size", type=positive_int, default=16, help="records per forward pass")
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
