"""One base class for every error a user can fix; the CLI catches it in one place.

Each message starts with what to look at (a config key, ``file:line``, a folder) and says
what was expected, so the CLI prints it as one line with no traceback.
"""

from __future__ import annotations

import json


class PreftuneError(Exception):
    """An error in the user's input, configuration, files or environment."""


class ConfigError(PreftuneError, ValueError):
    """A bad configuration value; the message names the key."""


class DataError(PreftuneError, ValueError):
    """Bad input data. The message names the source, line (or row) and field."""


class ModelLoadError(PreftuneError, RuntimeError):
    """The model or tokenizer could not be loaded; the message says which and why."""


class CheckpointError(PreftuneError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder."""


class ReferenceCacheError(PreftuneError, RuntimeError):
    """A cached reference does not match this run."""


class ScorerError(PreftuneError, RuntimeError):
    """A reward model or reward function that cannot score; the message names it."""


def json_problem(err: json.JSONDecodeError) -> str:
    """``Expecting ',' delimiter at column 12``: Python's "Invalid control character at" already
    ends in "at", which the column must not repeat."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"
