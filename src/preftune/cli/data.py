"""``preftune config | check-data | cache | pipeline run | synthetic-task``: the commands about
configs, data files and pipelines, around training rather than training itself."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError, DataError
from .flags import add_key_flags, load_run, record
from .foreign import add_foreign_config_options, show_foreign
from .values import count, positive_int


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
    # Under a launcher (the model's log-probs shared out) every process reads the data; one speaks.
    quiet = os.environ.get("RANK", "0") != "0"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        _check_pairs(args)


def _check_pairs(args: argparse.Namespace) -> None:
    from ..data import scan
    from ..data.prepare import finish_pairs
    from ..data.report import windowed_line
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
    kept = f"; {report.kept} pair{'s' * (report.kept != 1)} kept" if tokenizer is not None else ""
    print(
        f"{args.file}: {report.records} records, {report.records - len(errors)} valid, {len(errors)} bad{kept}"
    )
    if tokenizer is not None and pairs:
        print(report.statistics())
        print(
            f"at {limits}: {report.prompt_truncated} prompts truncated, {report.completion_truncated} pairs' "
            f"completions truncated, {report.dropped_overlong_prompt} pairs dropped"
        )
        if report.windowed:
            print(windowed_line(report.windowed, "pairs"))
    elif tokenizer is None:
        print("token lengths: give --model (a tokenizer) to see them and what the limits would cut")
    print(f"chosen identical to rejected: {report.identical}")
    _findings(report.findings)
    if errors:
        print("data report: given once every record is good")
    elif report.records:
        _data_report(args, config, pairs if tokenizer is not None else None, tokenizer, report.identical)
    _bad_records(errors, args.max_errors, report.records, args.file)
    # train's verdicts and exit code; which pairs are kept is known only with a tokenizer
    if tokenizer is not None or report.identical == report.records:
        finish_pairs(report, errors, args.file, args.max_errors, None)


def _data_report(
    args: argparse.Namespace, config: RunConfig, pairs: Any, tokenizer: Any, identical: int
) -> None:
    from ..evaluation.data_report import ReportOptions, data_report

    options = ReportOptions(
        config.model.name_or_path or None,
        args.reward,
        config.data.eval_path,
        args.output and Path(args.output),
        args.sample,
    )
    data_report(args.file, pairs, tokenizer, config, options, identical)


def _findings(findings: Any) -> None:
    """The data rules' findings as a short table (rule, records affected, setting, first example)."""
    if findings.by_rule:
        print(findings.table())


def _bad_records(errors: list[DataError], max_errors: int, records: int, name: str) -> None:
    if errors:
        shown = "\n  ".join(str(err) for err in errors)
        more = " (stopped there; --max-errors to see more)" if len(errors) >= max_errors else ""
        raise DataError(f"{len(errors)} bad records{more}:\n  {shown}")
    if records == 0:  # train refuses an empty file: a check that passes it would mislead a CI gate
        raise DataError(f"{name}: no records")


def _check_unpaired(args: argparse.Namespace, config: RunConfig, tokenizer: object) -> None:
    """``check-data`` for an unpaired objective (``--set objective.loss=kto``): unpaired records and
    pairs, as the KTO recipe reads them."""
    from ..data import scan_unpaired
    from ..data.unpaired import finish_unpaired

    data = config.data
    _, report, errors = scan_unpaired(args.file, tokenizer, data, data.split, True, args.max_errors)
    if tokenizer is None:
        print(
            f"{args.file}: {report.records} records, {report.examples} examples ({report.pairs} from pairs)"
        )
        print("token lengths: give --model (a tokenizer) to see them and what the limits would cut")
    else:
        print(f"{args.file}: {report.summary(with_findings=False)}")
    _findings(report.findings)
    _bad_records(errors, args.max_errors, report.records, args.file)
    if tokenizer is not None:  # the KTO recipe's verdicts (examples kept need the tokenizer)
        finish_unpaired(report, errors, args.file, args.max_errors, None)


def _cache(args: argparse.Namespace) -> None:
    """``preftune cache ls`` lists the tokenized stores; ``preftune cache clear`` removes them."""
    from ..data.cache import cache_root, clear, listing

    root = Path(args.dir).expanduser() if args.dir else cache_root()
    if args.cache_command == "clear":
        removed = clear(root, args.names)
        print(f"{root}: removed {len(removed)} tokenized store{'s' * (len(removed) != 1)}")
        return
    rows = listing(root) if root.exists() else []
    print(
        f"{root}: {len(rows)} tokenized store{'s' * (len(rows) != 1)}, {_size(sum(r['bytes'] for r in rows))}"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['name']}  damaged: {row['error']}")
        else:
            print(
                f"{row['name']}  {row['examples']} {row['kind']} from {row['source']}, "
                f"{_size(row['bytes'])}, {row['created']}"
            )


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count} B"


def _pipeline(args: argparse.Namespace) -> None:
    from ..recipes.pipeline import run_pipeline

    run_pipeline(Path(args.file), start=args.start, only=args.only)


def _synthetic_task(args: argparse.Namespace) -> None:
    from ..experiments.synthetic import write_task

    for name, path in write_task(args.output, seed=args.seed).items():
        print(f"{name:20} {path}")


def add_data_commands(commands: Any, keys_help: str) -> None:
    """``config``, ``check-data``, ``cache ls|clear``, ``pipeline run``, ``synthetic-task``."""
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
        help="a tokenizer (token lengths, what the limits cut), or the reference model: also its log-probs",
    )
    check.add_argument(
        "--reward", help="a reward-model folder or module:function: its agreement with the labels"
    )
    record(
        check,
        "--eval-data",
        key="data.eval_path",
        metavar="FILE",
        help="held-out pairs (data.eval_path): pairs shared with FILE",
    )
    check.add_argument(
        "--output", metavar="REPORT.json", help="write the data report, and its figure as .png"
    )
    check.add_argument(
        "--sample",
        type=count,
        default=2000,
        metavar="N",
        help="edit distances, log-probs and rewards on a uniform sample of N pairs (0: all; default 2000)",
    )
    check.add_argument("--config", help="YAML config whose data section (fields, limits) applies")
    record(check, "--set", key="", metavar="SECTION.KEY=VALUE", help="override a config value")
    check.add_argument(
        "--max-errors", type=positive_int, default=50, help="stop after this many bad records (default 50)"
    )
    check.add_argument("--margins", action="store_true", help="also check the reward-model margin column")
    add_key_flags(check, "check-data", skip=("data.path",))
    check.set_defaults(run=_check_data)

    cache = commands.add_parser(
        "cache", help="list or remove the tokenized stores that train, sft and rm train reuse"
    )
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    for name, text in (("ls", "list the stores: kind, source, examples, size"), ("clear", "remove stores")):
        sub = cache_commands.add_parser(name, help=text)
        sub.add_argument(
            "--dir", help="the cache folder (default: $PREFTUNE_CACHE_DIR or $HF_HOME/preftune/tokenized)"
        )
        if name == "clear":
            sub.add_argument("names", nargs="*", help="stores to remove, as ls names them (default: all)")
        sub.set_defaults(run=_cache)

    pipeline = commands.add_parser("pipeline", help="run named stages (sft, rm, dpo, …) from one YAML file")
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    pipeline_run = pipeline_commands.add_parser("run", help="run the stages in order, skipping complete ones")
    pipeline_run.add_argument("file", help="pipeline YAML: output, and stages with their config sections")
    pipeline_run.add_argument(
        "--from", dest="start", metavar="STAGE", help="run it and later ones, even if complete"
    )
    pipeline_run.add_argument("--only", metavar="STAGE", help="run only this stage, even if complete")
    pipeline_run.set_defaults(run=_pipeline)

    task = commands.add_parser(
        "synthetic-task",
        help="write the built-in task to a folder: a tiny base model, SFT, preference and held-out files",
    )
    task.add_argument("output", help="folder to write")
    task.add_argument("--seed", type=count, default=0)
    task.set_defaults(run=_synthetic_task)
