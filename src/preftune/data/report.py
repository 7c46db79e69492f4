"""What happened to the records on their way to token ids: counts and token lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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

    def summary(self) -> str:
        lines = [
            f"{self.kept}/{self.records} pairs kept",
            f"prompt tokens: {spread(self.prompt_lengths)}; completion tokens: {spread(self.completion_lengths)}",
        ]
        if self.prompt_truncated or self.completion_truncated:
            lines.append(
                f"truncated: {self.prompt_truncated} prompts (kept their end), "
                f"{self.completion_truncated} pairs' completions (kept their start)"
            )
        if self.dropped_overlong_prompt:
            lines.append(f"dropped: {self.dropped_overlong_prompt} pairs whose prompt fills max_length")
        if self.identical:
            lines.append(
                f"{self.identical} pairs have chosen identical to rejected ({self.dropped_identical} dropped)"
            )
        return "\n".join(lines)


def spread(lengths: list[int]) -> str:
    """Mean, p95 and max of token lengths, for the reports."""
    if not lengths:
        return "-"
    ordered = sorted(lengths)
    return f"mean {sum(lengths) / len(lengths):.1f}, p95 {p95(ordered)}, max {ordered[-1]}"


def p95(ordered: list[int]) -> int:
    return ordered[math.ceil(0.95 * (len(ordered) - 1))]
