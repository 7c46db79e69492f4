"""Several rewards for one completion (the members of a reward-model ensemble, or the columns a
reward function returns) made into the one reward an optimizer follows.

    mean            (1/K) Σ_k r_k
    min             min_k r_k                                  worst case (Coste et al. 2023, "WCO")
    mean_minus_std  (1/K) Σ_k r_k − λ · sqrt((1/K) Σ_k (r_k − mean)²)

``mean_minus_std`` is uncertainty-weighted optimization: where the members disagree the reward is
lowered by λ standard deviations. Coste et al. (arXiv 2310.02743, §4) subtract λ times the
*variance*; the standard deviation is in the reward's own units, so one λ means the same on
reward models whose scales differ. The std is the population one (divided by K, not K − 1), as
their variance is: with two members it is half their difference.

A completion that any member leaves unscored (NaN) is unscored: the aggregate of a row with a NaN
is NaN. The members' disagreement is the same standard deviation, averaged over completions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

AGGREGATES = ("mean", "min", "mean_minus_std")


def member_std(row: Sequence[float]) -> float:
    """Population standard deviation of one completion's member rewards (NaN if any is NaN)."""
    mean = sum(row) / len(row)
    return math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))


def aggregate_row(row: Sequence[float], how: str, penalty: float = 1.0) -> float:
    """One completion's reward from its members' rewards ``row`` (see the module docstring)."""
    if any(math.isnan(r) for r in row):
        return math.nan
    if how == "mean":
        return sum(row) / len(row)
    if how == "min":
        return min(row)
    if how == "mean_minus_std":
        return sum(row) / len(row) - penalty * member_std(row)
    raise ValueError(f"unknown aggregate {how!r}; one of {', '.join(AGGREGATES)}")


@dataclass
class Scores:
    """A scorer's answer for N completions: the reward optimized, and each member's when there are
    several (``members[i][k]``: completion i, member k)."""

    rewards: list[float]
    members: list[list[float]] | None = None

    def disagreement(self) -> float | None:
        """Mean over the scored completions of the members' standard deviation (None: one member)."""
        if not self.members or len(self.members[0]) < 2:
            return None
        stds = [member_std(row) for row in self.members if not any(math.isnan(r) for r in row)]
        return sum(stds) / len(stds) if stds else None

    def member_means(self) -> list[float] | None:
        """Each member's mean reward over the completions every member scored."""
        if not self.members:
            return None
        rows = [row for row in self.members if not any(math.isnan(r) for r in row)]
        if not rows:
            return None
        return [sum(column) / len(rows) for column in zip(*rows, strict=True)]


def aggregate_rows(members: Sequence[Sequence[float]], how: str, penalty: float = 1.0) -> Scores:
    """Scores from per-completion member rewards ``members[i][k]``."""
    rows = [list(map(float, row)) for row in members]
    return Scores([aggregate_row(row, how, penalty) for row in rows], rows)


def score_detail(scorer: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> Scores:
    """The scorer's rewards, with its members' when it has several (an ensemble folder, or a
    function that answers with several columns); any other scorer is one member."""
    detail = getattr(scorer, "detail", None)
    if callable(detail):
        scores: Scores = detail(prompts, completions)
        return scores
    answer = scorer(prompts, completions)
    return Scores([math.nan if value is None else float(value) for value in answer])
