"""Typed values for the config dataclasses, from YAML (already typed) or ``--set`` text.

A value is checked against its field's annotation; text from ``--set`` is parsed by the type
it is meant to have (so ``--set model.revision=0123`` stays text). Unknown keys get a
did-you-mean suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from ..errors import ConfigError


def need(ok: bool, key: str, message: str) -> None:
    """The one check every config rule uses: ``key: message`` as a :class:`ConfigError` when not ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_NULLS = {"null", "none", "~"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``.

    Values from YAML files arrive typed; values from ``--set`` arrive as raw text and are
    parsed here by the type they are meant to have (so ``--set model.revision=0123`` stays text).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(value, args, key)
    if origin is Literal:
        return _literal(value, args, key)
    if origin is list:
        return _list(value, args[0], key)
    scalar = _SCALARS.get(hint)
    return value if scalar is None else scalar(value, key)


def _union(value: Any, members: tuple[Any, ...], key: str) -> Any:
    """The first member type that takes ``value``; None for an optional one given null."""
    optional = type(None) in members
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)):
        return None
    candidates = [a for a in members if a is not type(None)]
    if isinstance(value, str) and ("," in value or value.lstrip().startswith("[")):
        candidates.sort(key=lambda a: typing.get_origin(a) is not list)  # "a,b" means a list
    errors = []
    for member in candidates:
        try:
            return _coerce(value, member, key)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")


def _literal(value: Any, choices: tuple[Any, ...], key: str) -> Any:
    if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
        value = "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as false
    if value not in choices:
        raise ConfigError(
            f"{key}: {value!r} is not one of {list(choices)}{suggest(str(value), map(str, choices))}"
        )
    return value


def _list(value: Any, item: Any, key: str) -> list[Any]:
    """A YAML list, or ``--set`` text: ``[a, b]`` in YAML's syntax or ``a,b``."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: malformed list {value!r}") from None
        else:
            value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _int(value: Any, key: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _str(value: Any, key: str) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # `revision: 20240101` in a YAML file
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


_SCALARS: dict[Any, typing.Callable[[Any, str], Any]] = {bool: _bool, int: _int, float: _float, str: _str}
"""The annotations parsed from text; any other is taken as given."""


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'{suggest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is None:  # an empty section in YAML
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a section (mapping)")
            kwargs[key] = build(hint, value, f"{prefix}{key}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def describe(root: type) -> list[tuple[str, str, str, str]]:
    """``(section.key, type, default, help)`` for every key of a config of sections (``root``),
    the help being the docstring line under each field in the source."""
    import ast
    import inspect
    import sys

    helps: dict[str, str] = {}
    # Sections may live in other modules than the root (the sampling recipes' in config_rl).
    sections = [typing.get_type_hints(root)[section.name] for section in dataclasses.fields(root)]
    modules = dict.fromkeys(cls.__module__ for cls in [root, *sections])
    trees = [ast.parse(inspect.getsource(sys.modules[name])) for name in modules]
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for field_node, after in zip(body, [*body[1:], None], strict=True):
                is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                if (
                    isinstance(field_node, ast.AnnAssign)
                    and isinstance(field_node.target, ast.Name)
                    and is_doc
                ):
                    text = " ".join(str(after.value.value).split())  # type: ignore[union-attr]
                    helps[f"{node.name}.{field_node.target.id}"] = text
    rows = []
    for section in dataclasses.fields(root):
        cls = typing.get_type_hints(root)[section.name]
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            default = (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            )
            hint = hints[item.name]
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            kind = kind.replace("NoneType", "None")
            rows.append(
                (
                    f"{section.name}.{item.name}",
                    kind,
                    repr(default),
                    helps.get(f"{cls.__name__}.{item.name}", ""),
                )
            )
    return rows
