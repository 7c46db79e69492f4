"""A run's TRL and LLaMA-Factory names, file and flags together, read through the tables of
:mod:`.compat`.

A flat file is LLaMA-Factory's when it holds a name only LLaMA-Factory has (``stage``,
``finetuning_type``, ``cutoff_len``, …), else TRL's. Flags speak the file's dialect (TRL's without
a foreign file); a name only the other tool has is read as that tool reads it. Precedence is the
usual one: the source's own defaults (a file only), then the file, then preftune's sections, then
the flags in command-line order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError
from .coerce import suggest
from .commands import COMMANDS, readers, reads
from .compat import (
    LLAMAFACTORY_OWN,
    TABLES,
    TRAINING_ARGUMENTS,
    TRL_CLI,
    TRL_LEGACY,
    TRL_OWN,
    source_defaults,
)
from .foreign import LABEL, Context, Rule, Setting, Source, read_rule

# Without LoRA, TRL's LoRA defaults change nothing and would only add notices.
_LORA_ONLY = ("lora_dropout",)


def detect(names: dict[str, Any]) -> Source:
    """``llamafactory`` when a name only LLaMA-Factory has is present, else ``trl``."""
    trl, lf = TABLES["trl"], TABLES["llamafactory"]
    return "llamafactory" if any(name in lf and name not in trl for name in names) else "trl"


class ForeignReader:
    """The settings of a run's foreign names: ``file_settings`` for the file (and the source's
    defaults), ``settings`` for one name, a flag at its place among the flags."""

    def __init__(self, file: dict[str, Any], flags: dict[str, Any], command: str | None, notices: list[str]):
        self.file = file
        self.command = command
        self.notices = notices
        self.source: Source = detect(file) if file else "trl"
        self.defaults = source_defaults(self.source, command) if file else {}
        names = {**self.defaults, **file, **flags}
        if self.source == "trl" and not names.get("use_peft"):
            self.defaults = {k: v for k, v in self.defaults.items() if k not in _LORA_ONLY}
        self.ctx = Context(self.source, command, names)
        self.given = set(file) | set(flags)

    def rule(self, name: str) -> tuple[Source, Rule]:
        for source in (self.source, "llamafactory" if self.source == "trl" else "trl"):
            if name in TABLES[source]:
                return source, TABLES[source][name]
        known = [*TABLES[self.source], *{s for sections in COMMANDS.values() for s in sections}]
        raise ConfigError(f"unknown key '{name}'{suggest(name, known)}")

    def settings(self, name: str, value: Any) -> list[Setting]:
        """The settings of one name, its notice said; refused when the command does not read them."""
        source, _ = self.rule(name)
        ctx = self.ctx if source == self.source else Context(source, self.command, self.ctx.names)
        settings, notice = read_rule(TABLES[source], name, value, ctx)
        for key, _ in settings:
            if self.command is not None and not reads(self.command, key):
                by = ", ".join(f"'preftune {c}'" for c in readers(key)) or "no command"
                raise ConfigError(
                    f"{name} ({LABEL[source]}'s name for {key}) is read by {by}, not by 'preftune {self.command}'"
                )
        if notice:
            self.notices.append(notice)
        return settings

    def file_settings(self) -> Iterator[Setting]:
        shown = []
        for name, value in self.defaults.items():
            if name in self.given:
                continue
            source, _ = self.rule(name)
            settings, _ = read_rule(TABLES[source], name, value, self.ctx)
            settings = [(k, v) for k, v in settings if self.command is None or reads(self.command, k)]
            shown += [f"{name}={_text(value)} -> {k}={_text(v)}" for k, v in settings]
            yield from settings
        if shown:
            self.notices.append(f"{self.source}: its defaults where preftune's differ: {', '.join(shown)}")
        for name, value in self.file.items():
            yield from self.settings(name, value)


def _text(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


_PARTS = {
    "trl": (
        ("transformers' TrainingArguments (every TRL trainer config, and LLaMA-Factory)", TRAINING_ARGUMENTS),
        ("TRL's own fields: the trainer configs, ModelConfig, ScriptArguments, dataset mixtures", TRL_OWN),
        ("Names of older TRL and transformers releases", TRL_LEGACY),
        ("Keys of TRL's launcher (`trl <command>`)", TRL_CLI),
    ),
    "llamafactory": (
        ("LLaMA-Factory's own fields (its TrainingArguments rows are TRL's table's)", LLAMAFACTORY_OWN),
    ),
}


def mapping_markdown(source: str) -> str:
    """The table of ``source``'s names, as ``docs/from-trl.md`` shows it (generated, so it cannot drift)."""
    lines = []
    for title, table in _PARTS[source]:
        kinds = [rule.kind for rule in table.values()]
        counts = ", ".join(
            f"{kinds.count(kind)} {kind}" for kind in ("mapped", "converted", "ignored", "refused")
        )
        lines += [f"#### {title}", "", f"{len(kinds)} names: {counts}.", ""]
        lines += ["| name | is | preftune | how |", "| --- | --- | --- | --- |"]
        for name, rule in table.items():
            key = f"`{rule.key}`" if rule.key else ""
            note = rule.note.replace("|", "\\|")
            lines.append(f"| `{name}` | {rule.kind} | {key} | {note} |")
        lines.append("")
    return "\n".join(lines)
