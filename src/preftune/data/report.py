"""What happened to the records on their way to token ids: counts, token lengths, and the
findings of the data rules (empty completions, chat-template checks, double BOS, …)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


@dataclass
class DataReport:
    """What happened to the records on their way to token ids."""

    records: int = 0
    kept: int = 0
    dropped_overlong_prompt: int = 0
    dropped_identical: int = 0
    identical: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    prompt_lengths: list[int] = field(default_factory=list, repr=False)
    """Token counts as in the data, before truncation (so are the next three)."""
    completion_lengths: list[int] = field(default_factory=list, repr=False)
    """The longer completion of each pair."""
    chosen_lengths: list[int] = field(default_factory=list, repr=False)
    rejected_lengths: list[int] = field(default_factory=list, repr=False)
    findings: Findings = field(default_factory=Findings, repr=False)
    """What the data rules found (counted once per record), beside the counts above."""

    def statistics(self) -> str:
        """Token lengths as a small table: min, median, p95, max of prompt, chosen and rejected."""
        lines = [f"{'tokens':10}{'min':>8}{'median':>8}{'p95':>8}{'max':>8}"]
        for side, xs in (
            ("prompt", self.prompt_lengths),
            ("chosen", self.chosen_lengths),
            ("rejected", self.rejected_lengths),
        ):
            ordered = sorted(xs) or [0]
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
        return "\n".join(lines + (self.findings.lines(skip=COUNTED_ABOVE) if with_findings else []))


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
    return lines


def spread(lengths: list[int]) -> str:
    """Mean, p95 and max of token lengths, for the reports."""
    if not lengths:
        return "-"
    ordered = sorted(lengths)
    return f"mean {sum(lengths) / len(lengths):.1f}, p95 {p95(ordered)}, max {ordered[-1]}"


def p95(ordered: list[int]) -> int:
    return ordered[math.ceil(0.95 * (len(ordered) - 1))]
