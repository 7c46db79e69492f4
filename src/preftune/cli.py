"""``preftune train | sft | online | ppo | rm train | rm score | eval | experiment | demo | losses | …``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli_data import add_data_commands
from .cli_sampling import add_sampling_commands
from .config import RunConfig, load_config
from .errors import ConfigError, PreftuneError

KEYS_HELP = "every config key, its type, default and meaning: preftune config"


def _run_config(args: argparse.Namespace) -> RunConfig:
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
    config = load_config(args.config, args.set or (), base)
    if not config.model.name_or_path:
        raise ConfigError("model.name_or_path: required (--model PATH_OR_NAME)")
    if not config.data.path:
        raise ConfigError("data.path: required (--data FILE_OR_NAME)")
    return config


def _train(args: argparse.Namespace) -> None:
    from .recipes.pairwise import train

    train(_run_config(args))


def _sft(args: argparse.Namespace) -> None:
    from .recipes.sft import train_sft

    train_sft(_run_config(args))


def _rm_train(args: argparse.Namespace) -> None:
    from .recipes.reward import train_reward_model

    train_reward_model(_run_config(args))


def _rm_score(args: argparse.Namespace) -> None:
    from .config import DataConfig
    from .scoring import RewardModelScorer, score_file

    scorer = RewardModelScorer(args.model, batch_size=args.batch_size, progress=True)
    summary = score_file(scorer, args.data, Path(args.output), DataConfig())
    print(f"scored {summary['records']} records -> {args.output}")
    if summary["accuracy"] is not None:
        print(
            f"accuracy (chosen scored above rejected): {summary['accuracy']:.1%} of {summary['pairs']} pairs"
        )
        if set(summary["subsets"]) - {"all"}:
            for name, accuracy in summary["subsets"].items():
                print(f"  {name:24} {accuracy:.1%}")


def _eval(args: argparse.Namespace) -> None:
    from .evaluate import parse_data_specs
    from .recipes.evaluation import run_eval

    config = load_config(args.config, args.set or (), {"model.name_or_path": args.policy})
    run_eval(
        config,
        parse_data_specs(args.data),
        Path(args.output),
        reference=args.reference,
        reward_model=args.reward_model,
        reward=args.reward,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        beta=args.beta,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def _experiment(args: argparse.Namespace) -> None:
    from . import experiments

    if args.list or not args.name:
        for name, (description, _) in experiments.EXPERIMENTS.items():
            print(f"{name:22} {description}")
        return
    _, run = experiments.get(args.name)
    run(Path(args.output or f"experiment-output/{args.name}"), args.seed, args.quick)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick)


def _losses(args: argparse.Namespace) -> None:
    from .losses import ALIASES, OPTIONS, PRESETS, REGISTRY, UNPAIRED

    def line(name: str, doc: str | None, flags: list[str], beta: float, uses: tuple[str, ...]) -> str:
        summary = " ".join((doc or "").strip().split("\n\n")[0].split())
        return f"{name:18} [{', '.join(flags)}] ({', '.join([f'beta={beta:g}', *uses])}) {summary}"

    for name, spec in sorted(REGISTRY.items()):
        flags = ["reference" if spec.needs_reference else "reference-free"]
        flags += ["length-normalized"] * spec.length_normalized + ["couples the batch"] * spec.couples_batch
        print(line(name, spec.fn.__doc__, flags, spec.default_beta, spec.uses))
    for name, unpaired in sorted(UNPAIRED.items()):
        flags = ["reference", "unpaired"] + ["KL per micro-batch"] * unpaired.needs_kl
        print(line(name, unpaired.fn.__doc__, flags, unpaired.default_beta, unpaired.uses))
    for name, terms in PRESETS.items():
        print(f"{name:18} [preset] " + " + ".join(t if w is None else f"{w}·{t}" for t, w in terms))
    print("aliases: " + ", ".join(f"{a} -> {b}" for a, b in sorted(ALIASES.items())))
    for name, text in OPTIONS.items():
        print(f"option {name}: {text}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description="Align language models with preference data."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(commands)
    add_sampling_commands(commands, KEYS_HELP)
    add_data_commands(commands, KEYS_HELP)
    _add_evaluation_commands(commands)
    return parser


def _add_training_commands(commands: Any) -> None:
    """``train``, ``sft``, ``rm train``, ``rm score``."""
    train = commands.add_parser(
        "train",
        help="train a policy on preference pairs (DPO and its family) or unpaired examples (KTO)",
        epilog=KEYS_HELP,
    )
    _training_arguments(train, "hub name or local folder of a causal LM", with_loss=True)
    train.set_defaults(run=_train)

    sft = commands.add_parser(
        "sft", help="supervised fine-tuning on prompt/completion, messages or text records", epilog=KEYS_HELP
    )
    _training_arguments(sft, "hub name or local folder of a causal LM", with_loss=False)
    sft.set_defaults(run=_sft)

    rm = commands.add_parser("rm", help="Bradley–Terry reward models: train, score")
    rm_commands = rm.add_subparsers(dest="rm_command", required=True)
    rm_train = rm_commands.add_parser(
        "train", help="train a reward model on preference pairs", epilog=KEYS_HELP
    )
    _training_arguments(rm_train, "a causal LM (gets a new reward head) or a reward model", with_loss=False)
    rm_train.set_defaults(run=_rm_train)
    rm_score = rm_commands.add_parser("score", help="score preference or (prompt, completion) records")
    rm_score.add_argument("--model", required=True, help="reward-model folder (rm train's OUTPUT/final)")
    rm_score.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet records")
    rm_score.add_argument("--output", required=True, help="scores, one JSON object per record")
    rm_score.add_argument("--batch-size", type=int, default=16)
    rm_score.set_defaults(run=_rm_score)


def _add_evaluation_commands(commands: Any) -> None:
    """``eval``, ``experiment``, ``demo``, ``losses``."""
    evaluation = commands.add_parser(
        "eval", help="DPO-RM vs EX-RM accuracy, ranking consistency, likelihood drift, KL on named sets"
    )
    evaluation.add_argument("--policy", required=True, help="the trained policy (a folder or hub name)")
    evaluation.add_argument("--reference", help="the reference it was trained from (log-ratios, drift, KL)")
    rewards = evaluation.add_mutually_exclusive_group()
    rewards.add_argument("--reward-model", help="a reward-model folder (rm train's OUTPUT/final)")
    rewards.add_argument("--reward", help="a reward function, module:function or file.py:function")
    evaluation.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a named preference set; repeat for several (id=…, prompt_shift=…, response_shift=…)",
    )
    evaluation.add_argument("--output", required=True, help="folder for eval.json, pairs/ and the plots")
    evaluation.add_argument(
        "--samples", type=int, default=0, metavar="K", help="sample K completions per prompt from each model"
    )
    evaluation.add_argument("--max-new-tokens", type=int, default=128, help="length limit of the samples")
    evaluation.add_argument("--beta", type=float, default=0.1, help="β of the DPO-RM margin (default 0.1)")
    evaluation.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    evaluation.add_argument("--seed", type=int, default=0, help="seed of the samples")
    evaluation.add_argument("--config", help="YAML file (model and data sections: dtype, fields, lengths)")
    evaluation.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value"
    )
    evaluation.set_defaults(run=_eval)

    experiment = commands.add_parser(
        "experiment", help="miniature reproductions of DPO's known failure modes (--list names them)"
    )
    experiment.add_argument("name", nargs="?", help="the experiment to run")
    experiment.add_argument("--list", action="store_true", help="list the experiments")
    experiment.add_argument("--output", help="folder for results.json, report.md, the PNG and the runs")
    experiment.add_argument(
        "--seed", type=int, default=0, help="seed of the data, the models and the training"
    )
    experiment.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke test")
    experiment.set_defaults(run=_experiment)

    demo = commands.add_parser("demo", help="end-to-end demo: tiny model, synthetic task, SFT then DPO")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--quick", action="store_true", help="fewer steps and prompts (for tests)")
    demo.set_defaults(run=_demo)

    losses = commands.add_parser("losses", help="list the registered objectives")
    losses.set_defaults(run=_losses)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default", UserWarning)
    from .distributed import close_process_group
    from .guard import StopRequested, tell_launcher

    try:
        args.run(args)
        close_process_group()  # launched: every process finished; end the group before the exit
    except StopRequested as stop:  # a signal: the run saved a checkpoint and can be resumed
        print(f"preftune: {stop}", file=sys.stderr)
        return stop.exit_code
    except PreftuneError as err:
        print(f"preftune: error: {err}", file=sys.stderr)
        tell_launcher(err)
        return 2
    except BrokenPipeError:  # `preftune losses | head`
        return 0
    except KeyboardInterrupt:
        print(
            "preftune: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr
        )
        return 130
    except Exception as err:
        tell_launcher(err)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
