"""The command line: ``preftune train | sft | rm | online | ppo | eval | check-data | pipeline |
config | experiment | demo | losses | synthetic-task``.

Each command lives with its kind (:mod:`.train`, :mod:`.sampling`, :mod:`.evaluation`,
:mod:`.data`); here are the parser and the one place that turns a user's error into one line.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import PreftuneError
from .data import add_data_commands
from .evaluation import add_evaluation_commands
from .sampling import add_sampling_commands
from .train import add_training_commands

KEYS_HELP = "every config key, its type, default and meaning: preftune config"


class _Parser(argparse.ArgumentParser):
    """argparse, with a did-you-mean for an unknown flag, and no abbreviations: among a hundred
    flags, ``--learning_rat`` must not quietly become ``--learning_rate``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})
        self.argv: list[str] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            flag = message.removeprefix("unrecognized arguments: ").split()[0].split("=")[0]
            command, parser = _command(self, self.argv)
            close = difflib.get_close_matches(flag, _option_strings(parser), n=1)
            if command and flag in _option_strings(self):
                # Another command's flag (check-data takes its file as an argument, not --data).
                message += f" ({command} has no {flag}: preftune {command} --help lists its arguments)"
            elif close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


def _command(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, argparse.ArgumentParser]:
    """The (sub)command ``argv`` names and its parser; the parser itself when it names none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    name, sub = _command(action.choices[word], argv[argv.index(word) + 1 :])
                    return f"{word} {name}".strip(), sub
    return "", parser


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of the parser and of its subcommands' parsers."""
    found = list(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _option_strings(sub)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preftune", description="Align language models with preference data.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_training_commands(commands, KEYS_HELP)
    add_sampling_commands(commands, KEYS_HELP)
    add_data_commands(commands, KEYS_HELP)
    add_evaluation_commands(commands)
    return parser


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """preftune's own warnings as one line, like its errors (not Python's two, the second a line of
    preftune's source); other packages' warnings as Python writes them."""
    if filename.startswith(_PACKAGE_DIR):
        return f"preftune: warning: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_python_format = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default", UserWarning)
    warnings.formatwarning = _format_warning
    from ..distributed import close_process_group
    from ..engine.guard import StopRequested, tell_launcher

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
