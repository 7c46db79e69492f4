"""``preftune eval | experiment | demo | losses``: the commands that measure, reproduce and list."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .flags import add_key_flags, load_run, record
from .values import count, positive_float, positive_int


def _eval(args: argparse.Namespace) -> None:
    from ..evaluation.evaluate import parse_data_specs
    from ..evaluation.run import run_eval
    from ..evaluation.settings import EvalSettings

    config = _eval_config(args)
    run_eval(
        config,
        parse_data_specs(args.data),
        Path(args.output),
        EvalSettings(
            beta=args.beta,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            batch_size=args.batch_size,
        ),
        reference=args.reference,
        reward_model=args.reward_model,
        reward=args.reward,
    )


def _eval_config(args: argparse.Namespace) -> Any:
    """The config file, then every flag in command-line order (--aggregate and its λ as keys)."""
    base: dict[str, object] = {"model.name_or_path": args.policy}
    if args.aggregate:
        base["reward.aggregate"] = args.aggregate
    if args.uncertainty_penalty is not None:
        base["reward.uncertainty_penalty"] = args.uncertainty_penalty
    return load_run(args, "eval", base)


def _experiment(args: argparse.Namespace) -> None:
    from .. import experiments

    if args.list or not args.name:
        for name, (description, _) in experiments.EXPERIMENTS.items():
            print(f"{name:22} {description}")
        return
    _, run = experiments.get(args.name)
    run(Path(args.output or f"experiment-output/{args.name}"), args.seed, args.quick)


def _demo(args: argparse.Namespace) -> None:
    from ..experiments.demo import run_demo

    run_demo(args.output, quick=args.quick)


def _losses(args: argparse.Namespace) -> None:
    from ..losses import ALIASES, OPTIONS, PRESETS, REGISTRY, UNPAIRED

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


def add_evaluation_commands(commands: Any) -> None:
    """``eval``, ``experiment``, ``demo``, ``losses``."""
    evaluation = commands.add_parser(
        "eval", help="DPO-RM vs EX-RM accuracy, ranking consistency, likelihood drift, KL on named sets"
    )
    evaluation.add_argument("--policy", required=True, help="the trained policy (a folder or hub name)")
    evaluation.add_argument("--reference", help="the reference it was trained from (log-ratios, drift, KL)")
    rewards = evaluation.add_mutually_exclusive_group()
    rewards.add_argument("--reward-model", help="a reward-model or ensemble folder (rm train's OUTPUT/final)")
    rewards.add_argument("--reward", help="a reward function, module:function or file.py:function")
    evaluation.add_argument(
        "--aggregate", help="an ensemble's members made one: mean, min, mean_minus_std (reward.aggregate)"
    )
    evaluation.add_argument(
        "--uncertainty-penalty",
        type=float,
        metavar="λ",
        help="λ of mean_minus_std (reward.uncertainty_penalty)",
    )
    evaluation.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a named preference set; repeat for several (id=…, prompt_shift=…, response_shift=…)",
    )
    evaluation.add_argument("--output", required=True, help="folder for eval.json, pairs/ and the plots")
    evaluation.add_argument(
        "--samples",
        type=count,
        default=0,
        metavar="K",
        help="sample K completions per prompt from each model",
    )
    evaluation.add_argument(
        "--max-new-tokens", type=positive_int, default=128, help="length limit of the samples"
    )
    evaluation.add_argument(
        "--beta", type=positive_float, default=0.1, help="β of the DPO-RM margin (default 0.1)"
    )
    evaluation.add_argument("--batch-size", type=positive_int, default=8, help="pairs per forward pass")
    evaluation.add_argument("--seed", type=count, default=0, help="seed of the samples")
    evaluation.add_argument("--config", help="YAML file (model and data sections: dtype, fields, lengths)")
    record(evaluation, "--set", key="", metavar="SECTION.KEY=VALUE", help="override a config value")
    add_key_flags(evaluation, "eval")
    evaluation.set_defaults(run=_eval)

    experiment = commands.add_parser(
        "experiment", help="miniature reproductions of DPO's known failure modes (--list names them)"
    )
    experiment.add_argument("name", nargs="?", help="the experiment to run")
    experiment.add_argument("--list", action="store_true", help="list the experiments")
    experiment.add_argument("--output", help="folder for results.json, report.md, the PNG and the runs")
    experiment.add_argument(
        "--seed", type=count, default=0, help="seed of the data, the models and the training"
    )
    experiment.add_argument("--quick", action="store_true", help="tiny sizes, seconds: a smoke test")
    experiment.set_defaults(run=_experiment)

    demo = commands.add_parser("demo", help="end-to-end demo: tiny model, synthetic task, SFT then DPO")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--quick", action="store_true", help="fewer steps and prompts (for tests)")
    demo.set_defaults(run=_demo)

    losses = commands.add_parser("losses", help="list the registered objectives")
    losses.set_defaults(run=_losses)
