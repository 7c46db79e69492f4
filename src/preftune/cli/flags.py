"""A flag for every config key a command reads, generated from the config dataclasses
(``--train.learning_rate 1e-6``), TRL's and LLaMA-Factory's names as flags
(``--per_device_train_batch_size 4``), and the one ordered list they all record into.

Every flag that sets a value (``--model``, ``--set``, a key's own flag, a TRL name) appends to
``args.settings`` in command-line order, so among flags the later one wins whatever its
spelling, and ``--train.seed 3`` is exactly ``--set train.seed=3``. The YAML file sits under all
of them (defaults < YAML < flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ..config import COMMANDS, RunConfig, load_config, readers
from ..config.coerce import describe
from ..config.compat import TABLES
from ..config.load import Override

TRUE_BY_DEFAULT = (
    "average_tokens_across_devices",
    "dataloader_in_order",
    "dataloader_pin_memory",
    "disable_dropout",
    "eval_do_concat_batches",
    "gradient_checkpointing",
    "log_on_each_node",
    "logging_nan_inf_filter",
    "remove_unused_columns",
    "skip_memory_metrics",
)
"""TRL's boolean fields whose default is true: its parser gives each a ``--no_<name>`` flag."""


class _Record(argparse.Action):
    """Append ``(key, value)`` (or a ``--set`` item) to ``namespace.settings`` in command-line order."""

    def __init__(self, option_strings: Sequence[str], dest: str, key: str = "", shape: Any = None, **kw: Any):
        self.key = key
        self.shape = shape
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        settings: list[Override] = list(getattr(namespace, "settings", None) or [])
        value = self.shape(values) if self.shape is not None else values
        settings.append(value if not self.key else (self.key, value))
        namespace.settings = settings


def record(parser: Any, *names: str, key: str, shape: Callable[[Any], Any] | None = None, **kw: Any) -> None:
    """A flag whose value sets ``key`` (``""``: a ``--set section.key=value`` item), in order."""
    parser.add_argument(*names, action=_Record, key=key, shape=shape, default=argparse.SUPPRESS, **kw)


def settings(args: argparse.Namespace) -> list[Override]:
    return list(getattr(args, "settings", None) or [])


def _one_or_list(values: Any) -> Any:
    """A bare flag is true; one value is text (parsed by the key's type, ``a,b`` a list); several a list."""
    if isinstance(values, list):
        return "true" if not values else values[0] if len(values) == 1 else values
    return "true" if values is None else values


def _kind(hint: Any) -> tuple[str, Any]:
    """The flag's shape for a field annotation: ``bool`` (bare or a value), ``list`` or one value."""
    args = typing.get_args(hint)
    members = args if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if bool in members:
        return ("bool|text" if str in members else "bool"), "?"
    if any(typing.get_origin(m) is list for m in members):
        return "list", "+"
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}", None
    names = [getattr(m, "__name__", str(m)) for m in members if m is not type(None)]
    return {"int": "N", "float": "X", "str": "TEXT"}.get(names[0], "VALUE"), None


def _summary(cls: type) -> str | None:
    """A section's docstring, first paragraph (dataclasses write a signature where there is none)."""
    doc = cls.__doc__ or ""
    return None if not doc or doc.startswith(cls.__name__ + "(") else " ".join(doc.split("\n\n")[0].split())


@functools.cache
def _helps() -> dict[str, tuple[str, str]]:
    """Each key's default and help, read once from the sections' source (every command's parser
    lists them)."""
    return {key: (default, text) for key, _, default, text in describe(RunConfig)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_key_flags(parser: argparse.ArgumentParser, command: str, skip: tuple[str, ...] = ()) -> None:
    """``--section.key VALUE`` for each key ``command`` reads, grouped by section in ``--help``;
    ``skip``: keys the command takes as its own argument."""
    # The usage line keeps the command's own flags; the keys, dozens of them, are listed by section.
    usage = parser.format_usage().removeprefix("usage: ").replace(parser.prog, "%(prog)s", 1).rstrip()
    parser.usage = f"{usage} [--SECTION.KEY VALUE ...]"
    sections = typing.get_type_hints(RunConfig)
    for section in COMMANDS[command]:
        cls = sections[section]
        group = parser.add_argument_group(f"{section} section", _summary(cls))
        hints = _hints(cls)
        for item in dataclasses.fields(cls):
            key = f"{section}.{item.name}"
            if command not in readers(key) or key in skip:
                continue
            default, text = _helps()[key]
            metavar, nargs = _kind(hints[item.name])
            record(
                group,
                f"--{key}",
                key=key,
                shape=_one_or_list,
                nargs=nargs,
                metavar={"bool": "BOOL", "bool|text": "BOOL|TEXT", "list": "VALUE"}.get(metavar, metavar),
                help=f"{text} (default: {default})".replace("``", "").replace("%", "%%"),
            )


def add_foreign_flags(parser: argparse.ArgumentParser) -> None:
    """TRL's and LLaMA-Factory's names as flags (``--learning_rate``, ``--learning-rate``,
    ``--use_peft``, ``--no_gradient_checkpointing``), kept out of ``--help``: they are many, and
    ``docs/from-trl.md`` lists them with what each becomes."""
    taken = set(parser._option_string_actions)
    names = dict.fromkeys([*TABLES["trl"], *TABLES["llamafactory"]])
    for name in names:
        spellings = [f"--{name}", f"--{name.replace('_', '-')}"]
        spellings = [s for s in dict.fromkeys(spellings) if s not in taken]
        if spellings:
            record(parser, *spellings, key=name, shape=_one_or_list, nargs="*", help=argparse.SUPPRESS)
            taken.update(spellings)
    for name in TRUE_BY_DEFAULT:
        spellings = [s for s in (f"--no_{name}", f"--no-{name.replace('_', '-')}") if s not in taken]
        record(parser, *spellings, key=name, shape=lambda _: "false", nargs=0, help=argparse.SUPPRESS)


def load_run(args: argparse.Namespace, command: str, base: dict[str, Any] | None = None) -> RunConfig:
    """The run's config from ``--config`` and the recorded flags; what each TRL or LLaMA-Factory
    name became is said on stderr, one line each, before anything loads."""
    notices: list[str] = []
    config = load_config(
        getattr(args, "config", None), settings(args), base, command=command, notices=notices
    )
    for line in notices:
        print(f"preftune: {line}", file=sys.stderr)
    return config
