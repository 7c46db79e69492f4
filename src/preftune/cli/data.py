"""``preftune config | check-data | pipeline run | synthetic-task``: the commands about configs,
data files and pipelines, around training rather than training itself."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError, DataError
from .flags import add_key_flags, load_run, record
from .foreign import add_foreign_config_options, show_foreign


def _config(args: argparse.Namespace) -> None:
    from ..config import SECTIONS, RunConfig
    from ..config.coerce import describe

    if args.from_trl or args.from_llamafactory or args.mapping:
        return show_foreign(args)

    rows = [row for row in describe(RunConfig) if not args.section or row[0].startswith(args.section + ".")]
    if not rows:
        raise ConfigError(f"{args.section}: no such section ({', '.join(SECTIONS)})")
    for key, kind, default, text in rows:
        print(f"{key}: {kind} = {default}\n    {text}")


def _check_data(args: argparse.Namespace) -> None:
    from ..data import scan
    from ..losses import is_unpaired
    from ..model.load import load_tokenizer

    config = load_run(args, "check-data", {"data.path": args.file})
    tokenizer = load_tokenizer(config.model, config.data.chat_template) if config.model.name_or_path else None
    if is_unpaired(config.objective):
        return _check_unpaired(args, config, tokenizer)
    margin = config.rm.margin_field if args.margins else None
    pairs, report, errors = scan(
        args.file, tokenizer, config.data, config.data.split, True, margin, args.max_errors
    )
    limits = (
        f"data.max_length={config.data.max_length}, data.max_prompt_length={config.data.max_prompt_length}"
    )
    print(f"{args.file}: {report.records} records, {report.records - len(errors)} valid, {len(errors)} bad")
    if tokenizer is not None and pairs:
        print(report.statistics())
        print(
            f"at {limits}: {report.prompt_truncated} prompts truncated, {report.completion_truncated} pairs' "
            f"completions truncated, {report.dropped_overlong_prompt} pairs dropped"
        )
    elif tokenizer is None:
        print("token lengths: give --model (a tokenizer) to see them and what the limits would cut")
    print(f"chosen identical to rejected: {report.identical}")
    _bad_records(errors, args.max_errors)


def _bad_records(errors: list[DataError], max_errors: int) -> None:
    if errors:
        shown = "\n  ".join(str(err) for err in errors)
        more = " (stopped there; --max-errors to see more)" if len(errors) >= max_errors else ""
        raise DataError(f"{len(errors)} bad records{more}:\n  {shown}")


def _check_unpaired(args: argparse.Namespace, config: RunConfig, tokenizer: object) -> None:
    """``check-data`` for an unpaired objective (``--set objective.loss=kto``): unpaired records and
    pairs, as the KTO recipe reads them."""
    from ..data import UnpairedReport, scan_unpaired
    from ..data.unpaired import read_unpaired

    data = config.data
    if tokenizer is None:
        report = UnpairedReport()
        errors: list[DataError] = []
        report.examples = len(
            read_unpaired(args.file, data, report, errors, data.split, True, args.max_errors)
        )
        print(
            f"{args.file}: {report.records} records, {report.examples} examples ({report.pairs} from pairs)"
        )
        print("token lengths: give --model (a tokenizer) to see them and what the limits would cut")
    else:
        _, report, errors = scan_unpaired(args.file, tokenizer, data, data.split, True, args.max_errors)
        print(f"{args.file}: {report.summary()}")
    _bad_records(errors, args.max_errors)


def _pipeline(args: argparse.Namespace) -> None:
    from ..recipes.pipeline import run_pipeline

    run_pipeline(Path(args.file), start=args.start, only=args.only)


def _synthetic_task(args: argparse.Namespace) -> None:
    from ..experiments.synthetic import write_task

    for name, path in write_task(args.output, seed=args.seed).items():
        print(f"{name:20} {path}")


def add_data_commands(commands: Any, keys_help: str) -> None:
    """``config``, ``check-data``, ``pipeline run``, ``synthetic-task``."""
    config = commands.add_parser("config", help="list every config key with its type, default and meaning")
    config.add_argument(
        "section", nargs="?", help="only this section: model, data, objective, reference, train, reward, …"
    )
    add_foreign_config_options(config)
    config.set_defaults(run=_config)

    check = commands.add_parser(
        "check-data",
        help="validate a whole data file without loading a model; report every bad record",
        epilog=keys_help,
    )
    check.add_argument("file", help="JSONL/JSON/CSV/Parquet file or hub dataset name")
    record(
        check,
        "--model",
        key="model.name_or_path",
        help="a tokenizer (hub name or folder): token lengths and what the limits cut",
    )
    check.add_argument("--config", help="YAML config whose data section (fields, limits) applies")
    record(check, "--set", key="", metavar="SECTION.KEY=VALUE", help="override a config value")
    check.add_argument(
        "--max-errors", type=int, default=50, help="stop after this many bad records (default 50)"
    )
    check.add_argument("--margins", action="store_true", help="also check the reward-model margin column")
    add_key_flags(check, "check-data", skip=("data.path",))
    check.set_defaults(run=_check_data)

    pipeline = commands.add_parser("pipeline", help="run named stages (sft, rm, dpo, …) from one YAML file")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    pipeline_run = pipeline_commands.add_parser("run", help="run the stages in order, skipping complete ones")
    pipeline_run.add_argument("file", help="pipeline YAML: output, and stages with their config sections")
    pipeline_run.add_argument("--from", dest="start", metavar="STAGE", help="rerun from this stage on")
    pipeline_run.add_argument("--only", metavar="STAGE", help="run only this stage")
    pipeline_run.set_defaults(run=_pipeline)

    task = commands.add_parser(
        "synthetic-task",
        help="write the built-in task to a folder: a tiny base model, SFT, preference and held-out files",
    )
    task.add_argument("output", help="folder to write")
    task.add_argument("--seed", type=int, default=0)
    task.set_defaults(run=_synthetic_task)
