"""TRL's and LLaMA-Factory's names read as preftune's keys: the machinery under the tables of
:mod:`.compat`.

A flat YAML written for ``trl dpo --config`` or ``llamafactory-cli train``, and flags spelled as
TRL spells them (``--learning_rate 1e-6``), are translated name by name. Each name has one
:class:`Rule`: *mapped* (renamed, the value as is), *converted* (the value changed, split or
decided by other names of the same file), *ignored* (it cannot change the trained weights or the
metrics: logging, speed, hub, launcher) or *refused* (preftune has nothing that does the same;
the message names what comes closest). Every name read prints one notice saying what it became,
so a user sees the run in preftune's words. A value that leaves a refused name without effect
(its default, null, false, an empty list) is accepted without a word, as are the ignored names at
such a value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError

Source = Literal["trl", "llamafactory"]
LABEL: dict[str, str] = {"trl": "TRL", "llamafactory": "LLaMA-Factory"}
Setting = tuple[str, Any]


class Context:
    """What a conversion may look at: the other names of the same run (file, flags and the
    source's materialized defaults merged, flags last), the source and the command."""

    def __init__(self, source: Source, command: str | None, names: dict[str, Any]):
        self.source = source
        self.command = command
        self.names = names

    def get(self, name: str, default: Any = None) -> Any:
        value = plain(self.names.get(name, default))
        return default if value is None else value

    def given(self, name: str) -> bool:
        return plain(self.names.get(name)) is not None


Converter = Callable[[Any, Context], list[Setting]]


@dataclass(frozen=True)
class Rule:
    """How one foreign name is read. ``key`` is the preftune key a mapped or converted name sets
    (the main one, for the docs table), or the closest key of an ignored or refused one."""

    kind: Literal["mapped", "converted", "ignored", "refused"]
    key: str = ""
    note: str = ""
    convert: Converter | None = None
    ok: tuple[Any, ...] = ()
    """Values that leave the name without effect besides null, false and empty ones: a refused
    name accepts them, an ignored one takes them without a notice."""
    secret: bool = False
    say: str = ""
    """A caveat the notice adds (a mapped name whose meaning differs in an edge)."""


def same(key: str, note: str = "", say: str = "") -> Rule:
    return Rule("mapped", key, note or say, say=say)


def converted(key: str, convert: Converter, note: str, ok: tuple[Any, ...] = (), say: str = "") -> Rule:
    return Rule("converted", key, note, convert, ok=ok, say=say)


def ignored(note: str, key: str = "", ok: tuple[Any, ...] = (), secret: bool = False) -> Rule:
    return Rule("ignored", key, note, ok=ok, secret=secret)


def refused(closest: str, note: str = "", ok: tuple[Any, ...] = ()) -> Rule:
    return Rule("refused", closest, note, ok=ok)


def each(names: str, rule: Rule) -> dict[str, Rule]:
    """One rule for several names (``"a b c"``)."""
    return dict.fromkeys(names.split(), rule)


# --------------------------------------------------------------------------- values


_WORDS = {
    "none": None,
    "null": None,
    "~": None,
    "": None,
    "true": True,
    "yes": True,
    "false": False,
    "no": False,
}


def plain(value: Any) -> Any:
    """A value as TRL's argparse would type it: flag text and YAML 1.1's unquoted ``5e-7`` (a
    string to PyYAML) become numbers, ``none``/``true``/``false`` their values."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def is_neutral(value: Any, ok: tuple[Any, ...] = ()) -> bool:
    value = plain(value)
    if value is None or value is False or value in ("", [], {}):
        return True
    if isinstance(value, str):
        return value.lower() in {str(o).lower() for o in ok if isinstance(o, str)}
    return any(type(value) is type(o) and value == o for o in ok if not isinstance(o, str))


def number(value: Any, name: str) -> float:
    value = plain(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    return float(value)


def steps(value: Any, name: str, key: str) -> int:
    """HF's ``*_steps``: a whole number of steps; a float in (0, 1) is a share of all steps,
    which preftune cannot know before the data is read."""
    v = number(value, name)
    if 0 < v < 1:
        raise ConfigError(
            f"{name}={value}: a share of all steps has no preftune equivalent; closest: {key}=N steps"
        )
    if v != int(v) or v < 1:
        raise ConfigError(f"{name}: expected a whole number of steps >= 1, got {value!r}")
    return int(v)


def names_list(value: Any) -> list[str]:
    """``"a,b"``, ``["a", "b"]`` or ``"a"`` as a list of names."""
    value = plain(value)
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


# --------------------------------------------------------------------------- LLaMA-Factory's datasets


def llamafactory_dataset(name: str, dataset_dir: str) -> tuple[str, dict[str, Any]]:
    """``dataset: dpo_en_demo`` names an entry of ``<dataset_dir>/dataset_info.json``, not a file:
    the entry's file (or hub name) and the entry itself."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"dataset: '{name}' is looked up in {info_path} (LLaMA-Factory's dataset_dir), which does "
            "not exist; set dataset_dir, or give preftune's data.path"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"dataset_dir: cannot read {info_path} ({err})") from None
    if "," in name:
        raise ConfigError(
            f"dataset: '{name}' names several datasets; closest: concatenate them into one file for data.path"
        )
    if name not in info:
        raise ConfigError(f"dataset: '{name}' is not in {info_path}")
    entry = info[name]
    if entry.get("file_name"):
        return str(Path(dataset_dir) / entry["file_name"]), entry
    if entry.get("hf_hub_url"):
        subset = f":{entry['subset']}" if entry.get("subset") else ""
        return f"{entry['hf_hub_url']}{subset}", entry
    where = next(
        (k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry), "?"
    )
    raise ConfigError(
        f"dataset: '{name}' comes from {where}; preftune reads local files and the Hugging Face hub"
    )


# --------------------------------------------------------------------------- translating


def read_rule(table: dict[str, Rule], name: str, value: Any, ctx: Context) -> tuple[list[Setting], str]:
    """The settings one foreign name makes, and its notice (empty when nothing needs saying)."""
    rule = table[name]
    label = f"{ctx.source}: {name}={'***' if rule.secret else _show(value)}"
    caveat = f" ({rule.say})" if rule.say else ""
    if rule.kind == "mapped":
        return [(rule.key, value)], f"{label} -> {rule.key}{caveat}"
    if rule.kind == "converted":
        assert rule.convert is not None
        settings = rule.convert(value, ctx)
        if settings:
            shown = ", ".join(f"{key}={_show(v)}" for key, v in settings)
            return settings, f"{label} -> {shown}{caveat}"
        return [], "" if is_neutral(value, rule.ok) else f"{label}: {rule.note}"
    if rule.kind == "ignored":
        return [], "" if is_neutral(value, rule.ok) else f"{label} ignored: {rule.note}"
    if is_neutral(value, rule.ok):
        return [], ""
    closest = f"; closest: {rule.key}" if rule.key else ""
    raise ConfigError(f"{label} has no preftune equivalent{': ' + rule.note if rule.note else ''}{closest}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
