"""What happened to the records on their way to token ids: counts, token lengths, and the
findings of the data rules (empty completions, chat-template checks, double BOS, …)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

FIRST_WHERES = 3
"""How many ``file:line``s a finding keeps, to point at without flooding the report."""

RULES: dict[str, str] = {
    "empty_completion": "empty completion",
    "no_preference": "no preference between the responses",
    "identical": "chosen identical to rejected",
    "identical_tokens": "identical after the chat template",
    "template_mismatch": "prompt alone renders differently",
    "stripped_content": "template drops answer text",
    "added_text": "template adds text to the answer",
    "missing_eos": "no EOS or end-of-turn token",
    "double_bos": "double BOS",
    "overlong_prompt": "prompt fills data.max_length",
}
"""Each rule's name in the reports, in the order they are shown."""


@dataclass
class Finding:
    """One rule over a whole source: how many records it touched, the first few places, one example."""

    rule: str
    setting: str
    """What was done, as the setting that decides it (``data.empty_completions=drop``)."""
    count: int = 0
    wheres: list[str] = field(default_factory=list)
    example: str = ""
    """The first record's evidence, shown once (the dropped text, the added text, …)."""
    seen: set[str] = field(default_factory=set, repr=False)


@dataclass
class Findings:
    """The findings of every rule, keyed by rule; a record counts once per rule."""

    by_rule: dict[str, Finding] = field(default_factory=dict)

    def note(self, rule: str, setting: str, where: str, example: str = "") -> None:
        finding = self.by_rule.setdefault(rule, Finding(rule, setting))
        if where in finding.seen:  # chosen and rejected of one record: one record
            return
        finding.seen.add(where)
        finding.count += 1
        if len(finding.wheres) < FIRST_WHERES:
            finding.wheres.append(where)
        if not finding.example:
            finding.example = example

    def get(self, rule: str) -> int:
        finding = self.by_rule.get(rule)
        return finding.count if finding else 0

    def merge(self, other: Findings) -> None:
        """``other``'s findings after these: the records of one chunk after the chunks before it
        (a record's notes all happen in its own chunk, so counts add)."""
        for rule, theirs in other.by_rule.items():
            ours = self.by_rule.setdefault(rule, Finding(rule, theirs.setting))
            ours.count += theirs.count
            ours.wheres += theirs.wheres[: FIRST_WHERES - len(ours.wheres)]
            ours.example = ours.example or theirs.example

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"rule": f.rule, "setting": f.setting, "count": f.count, "wheres": f.wheres, "example": f.example}
            for f in self.by_rule.values()
        ]

    @classmethod
    def from_json(cls, rows: list[dict[str, Any]]) -> Findings:
        return cls({row["rule"]: Finding(**row) for row in rows})

    def renamed(self, old: str, new: str) -> None:
        """Wheres named after the source as another run gave it (``data/x.jsonl`` for ``x.jsonl``)."""
        if old and new and old != new:
            for f in self.by_rule.values():
                f.wheres = [new + w[len(old) :] if w.startswith(old) else w for w in f.wheres]

    def ordered(self) -> list[Finding]:
        return sorted(self.by_rule.values(), key=lambda f: list(RULES).index(f.rule))

    def lines(self, skip: tuple[str, ...] = ()) -> list[str]:
        """One line per rule that touched a record: what, how many, the setting, where, the evidence."""
        out = []
        for f in self.ordered():
            if f.rule in skip:
                continue
            more = ", …" if f.count > len(f.wheres) else ""
            evidence = f"; first: {f.example}" if f.example else ""
            out.append(
                f"{RULES[f.rule]}: {f.count} record{'s' * (f.count != 1)} ({f.setting}) "
                f"at {', '.join(f.wheres)}{more}{evidence}"
            )
        return out

    def table(self) -> str:
        """``check-data``'s table: rule, records affected, the setting, the first example."""
        rows = [("rule", "records", "setting", "first example")]
        for f in self.ordered():
            example = f"{f.wheres[0]}: {f.example}" if f.example else f.wheres[0]
            rows.append((RULES[f.rule], str(f.count), f.setting, example))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows
        )


def shown(text: str, limit: int = 60) -> str:
    """A piece of text as evidence: quoted, escapes visible, long middles elided."""
    if len(text) > limit:
        text = text[: limit // 2] + "…" + text[-limit // 2 :]
    return repr(text)


class Lengths:
    """Token lengths of every example: appended one by one within a chunk, kept as int32 arrays
    (four bytes an example, not a Python int in a list)."""

    def __init__(self, values: Iterable[int] = ()):
        self._arrays: list[np.ndarray] = []
        self._tail: list[int] = list(values)

    def append(self, length: int) -> None:
        self._tail.append(length)

    def extend(self, other: Lengths | np.ndarray) -> None:
        self._flush()
        self._arrays.append(other.array() if isinstance(other, Lengths) else np.asarray(other, np.int32))

    def _flush(self) -> None:
        if self._tail:
            self._arrays.append(np.array(self._tail, dtype=np.int32))
            self._tail = []

    def array(self) -> np.ndarray:
        self._flush()
        if len(self._arrays) != 1:
            self._arrays = [np.concatenate(self._arrays) if self._arrays else np.zeros(0, np.int32)]
        return self._arrays[0]

    def __len__(self) -> int:
        return sum(len(a) for a in self._arrays) + len(self._tail)

    def __iter__(self) -> Iterator[int]:
        return iter(self.array().tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Lengths | list | tuple | np.ndarray):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Lengths({len(self)})"


R = TypeVar("R")


def merge_reports(ours: Any, theirs: Any) -> None:
    """``theirs`` (a report of the same kind, of a later chunk) added to ``ours``: counts add,
    lengths follow, findings merge."""
    for f in fields(ours):
        mine, other = getattr(ours, f.name), getattr(theirs, f.name)
        if isinstance(mine, Lengths):
            mine.extend(other)
        elif isinstance(mine, Findings):
            mine.merge(other)
        elif isinstance(mine, int) and not isinstance(mine, bool):
            setattr(ours, f.name, mine + other)


def save_report(report: Any, folder: Path) -> dict[str, Any]:
    """The report as JSON, its lengths as ``<name>.lengths`` files in ``folder`` (a store's)."""
    out: dict[str, Any] = {}
    for f in fields(report):
        value = getattr(report, f.name)
        if isinstance(value, Lengths):
            (folder / f"{f.name}.lengths").write_bytes(value.array().tobytes())
        elif isinstance(value, Findings):
            out[f.name] = value.to_json()
        elif isinstance(value, int | float | str):
            out[f.name] = value
    return out


def load_report(kind: type[R], saved: dict[str, Any], folder: Path) -> R:
    """The report :func:`save_report` kept; its lengths mapped from the store's files."""
    report = kind()
    for f in fields(report):  # type: ignore[arg-type]
        value = getattr(report, f.name)
        if isinstance(value, Lengths):
            path = folder / f"{f.name}.lengths"
            value.extend(np.fromfile(path, dtype=np.int32) if path.stat().st_size else np.zeros(0, np.int32))
        elif isinstance(value, Findings):
            setattr(report, f.name, Findings.from_json(saved.get(f.name, [])))
        elif f.name in saved:
            setattr(report, f.name, saved[f.name])
    return report


@dataclass
class DataReport:
    """What happened to the records on their way to token ids."""

    records: int = 0
    kept: int = 0
    dropped_overlong_prompt: int = 0
    dropped_identical: int = 0
    identical: int = 0
    windowed: int = 0
    """Records with a text so long that only the part truncation keeps was tokenized
    (:mod:`.window`); their lengths below count that part."""
    prompt_truncated: int = 0
    completion_truncated: int = 0
    prompt_lengths: Lengths = field(default_factory=Lengths, repr=False)
    """Token counts as in the data, before truncation (so are the next three)."""
    completion_lengths: Lengths = field(default_factory=Lengths, repr=False)
    """The longer completion of each pair."""
    chosen_lengths: Lengths = field(default_factory=Lengths, repr=False)
    rejected_lengths: Lengths = field(default_factory=Lengths, repr=False)
    findings: Findings = field(default_factory=Findings, repr=False)
    """What the data rules found (counted once per record), beside the counts above."""
    cache: str = ""
    """Where the token ids are kept and whether this run reused them (the summary's last line)."""

    def statistics(self) -> str:
        """Token lengths as a small table: min, median, p95, max of prompt, chosen and rejected."""
        lines = [f"{'tokens':10}{'min':>8}{'median':>8}{'p95':>8}{'max':>8}"]
        for side, xs in (
            ("prompt", self.prompt_lengths),
            ("chosen", self.chosen_lengths),
            ("rejected", self.rejected_lengths),
        ):
            ordered = np.sort(xs.array()) if len(xs) else np.zeros(1, np.int32)
            quantiles = (ordered[0], ordered[len(ordered) // 2], p95(ordered), ordered[-1])
            lines.append(f"{side:10}" + "".join(f"{q:>8}" for q in quantiles))
        return "\n".join(lines)

    def summary(self, with_findings: bool = True) -> str:
        lines = [
            f"{self.kept}/{self.records} pairs kept",
            f"prompt tokens: {spread(self.prompt_lengths)}; completion tokens: {spread(self.completion_lengths)}",
        ]
        lines += truncation_lines(self, "pairs' completions", "pairs")
        if self.identical:
            lines.append(
                f"{self.identical} pairs have chosen identical to rejected ({self.dropped_identical} dropped)"
            )
        lines += self.findings.lines(skip=COUNTED_ABOVE) if with_findings else []
        return "\n".join(lines + ([self.cache] if self.cache else []))


COUNTED_ABOVE = ("identical", "overlong_prompt")
"""Rules the summaries already count in lines of their own."""


def truncation_lines(report: DataReport, completions: str, items: str) -> list[str]:
    lines = []
    if report.prompt_truncated or report.completion_truncated:
        lines.append(
            f"truncated: {report.prompt_truncated} prompts (kept their end), "
            f"{report.completion_truncated} {completions} (kept their start)"
        )
    if report.dropped_overlong_prompt:
        lines.append(f"dropped: {report.dropped_overlong_prompt} {items} whose prompt fills max_length")
    if report.windowed:
        lines.append(windowed_line(report.windowed, items))
    return lines


def windowed_line(count: int, items: str) -> str:
    """``items`` is a plural (pairs, examples, records)."""
    one = count == 1
    return (
        f"long texts: {count} {items[:-1] if one else items} {'holds' if one else 'hold'} a text too long to "
        f"tokenize whole; only the part data.max_length keeps was tokenized ({'its' if one else 'their'} "
        "token counts above count that part)"
    )


def spread(lengths: Lengths) -> str:
    """Mean, p95 and max of token lengths, for the reports."""
    if not len(lengths):
        return "-"
    ordered = np.sort(lengths.array())
    return f"mean {int(ordered.sum()) / len(ordered):.1f}, p95 {p95(ordered)}, max {int(ordered[-1])}"


def p95(ordered: Any) -> int:
    return int(ordered[math.ceil(0.95 * (len(ordered) - 1))])
