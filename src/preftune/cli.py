"""``preftune train | demo | losses``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from .config import ConfigError, load_config


def _train(args: argparse.Namespace) -> None:
    from .trainer import train

    base: dict[str, object] = {}
    if args.model:
        base["model.name_or_path"] = args.model
    if args.data:
        base["data.path"] = args.data
    if args.eval_data:
        base["data.eval_path"] = args.eval_data
    if args.loss:
        base["objective.loss"] = [name for name in args.loss.split(",") if name]
    if args.output:
        base["train.output_dir"] = args.output
    if args.resume:
        base["train.resume"] = True
    config = load_config(args.config, args.set or (), base)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required (--model PATH_OR_NAME)")
    if not config.data.path:
        raise ConfigError("data.path: required (--data FILE_OR_NAME)")
    train(config)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick)


def _losses(args: argparse.Namespace) -> None:
    from .losses import ALIASES, PRESETS, REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        summary = " ".join((spec.fn.__doc__ or "").strip().split("\n\n")[0].split())
        flags = ("reference" if spec.needs_reference else "reference-free") + (
            ", length-normalized" if spec.length_normalized else ""
        )
        print(f"{name:14} [{flags}] {summary}")
    for name, terms in PRESETS.items():
        print(f"{name:14} [preset] " + " + ".join(t if w is None else f"{w}·{t}" for t, w in terms))
    print("aliases: " + ", ".join(f"{a} -> {b}" for a, b in sorted(ALIASES.items())))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Align language models with preference data."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy on preference pairs")
    train.add_argument("--model", help="hub name or local folder of a causal LM")
    train.add_argument("--data", help="JSONL/JSON/CSV/Parquet file or hub dataset name")
    train.add_argument("--eval-data", help="held-out pairs, evaluated every train.eval_every steps")
    train.add_argument("--loss", help="objective name(s), comma-separated: dpo, dpop, simpo, ipo, …")
    train.add_argument("--output", help="output folder (train.output_dir)")
    train.add_argument("--config", help="YAML file with model/data/objective/reference/train sections")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output"
    )
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="end-to-end demo: tiny model, synthetic task, SFT then DPO")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--quick", action="store_true", help="fewer steps and prompts (for tests)")
    demo.set_defaults(run=_demo)

    losses = commands.add_parser("losses", help="list the registered objectives")
    losses.set_defaults(run=_losses)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import ModelLoadError
    from .reference import ReferenceCacheError

    args = build_parser().parse_args(argv)
    warnings.simplefilter("default", UserWarning)
    try:
        args.run(args)
    except (ConfigError, DataError, ModelLoadError, ReferenceCacheError, CheckpointError) as err:
        print(f"preftune: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `preftune losses | head`
        return 0
    except KeyboardInterrupt:
        print(
            "preftune: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
