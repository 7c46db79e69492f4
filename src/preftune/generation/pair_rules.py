"""Scored samples -> preference pairs, by a named rule (online DPO).

Each prompt has K sampled completions with rewards (``None`` or NaN: unscored). A rule picks
(chosen, rejected) among the scored ones of each prompt:

* ``best_worst``   the highest-rewarded against the lowest (RLHFlow's iterative DPO);
* ``best_random``  the highest against a random one rewarded lower;
* ``all_above_gap`` every two completions whose rewards differ by at least ``min_gap``.

A pair needs a strict reward difference (ties are dropped) of at least ``min_gap``, and two
different completions (the same tokens twice teach nothing). What was dropped is counted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class PairCounts:
    prompts: int = 0
    samples: int = 0
    unscored: int = 0
    """Samples without a reward (``None``/NaN), left out before pairing."""
    pairs: int = 0
    ties: int = 0
    """Candidate pairs dropped because both rewards were equal."""
    below_gap: int = 0
    """Candidate pairs dropped because the rewards differed by less than ``min_gap``."""
    identical: int = 0
    """Candidate pairs dropped because both completions were the same tokens."""
    prompts_without_pair: int = 0
    per_prompt: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs from {self.prompts} prompts x {self.samples // max(self.prompts, 1)} samples; "
            f"dropped: {self.ties} ties, {self.below_gap} below the gap, {self.identical} identical, "
            f"{self.unscored} unscored samples; prompts without a pair: {self.prompts_without_pair}"
        )


def scored(reward: float | None) -> bool:
    return reward is not None and math.isfinite(reward)


def _verdict(a: int, b: int, rewards: Sequence[float], same: bool, min_gap: float) -> str:
    """'ok' when (a, b) may be a pair (a rewarded higher), else why not."""
    gap = rewards[a] - rewards[b]
    if gap == 0:
        return "ties"
    if same:
        return "identical"
    if gap < min_gap:
        return "below_gap"
    return "ok"


def build_pairs(
    rewards: Sequence[Sequence[float | None]],
    completions: Sequence[Sequence[Sequence[int]]],
    rule: str,
    min_gap: float = 0.0,
    seed: int = 0,
) -> tuple[list[tuple[int, int, int]], PairCounts]:
    """``(prompt, chosen sample, rejected sample)`` index triples, and what was dropped.

    ``rewards[p][k]`` and ``completions[p][k]`` (token ids) are prompt ``p``'s ``k``-th sample.
    ``best_random`` draws from ``random.Random(seed)``, so a rerun builds the same pairs.
    """
    rng = random.Random(seed)
    counts = PairCounts(prompts=len(rewards))
    out: list[tuple[int, int, int]] = []
    for p, (prompt_rewards, prompt_completions) in enumerate(zip(rewards, completions, strict=True)):
        counts.samples += len(prompt_rewards)
        keep = [k for k, r in enumerate(prompt_rewards) if scored(r)]
        counts.unscored += len(prompt_rewards) - len(keep)
        values = [float(r) if scored(r) else math.nan for r in prompt_rewards]  # type: ignore[arg-type]
        # Highest first; equal rewards keep sample order, so the choice is deterministic.
        ranked = sorted(keep, key=lambda k: -values[k])
        candidates: list[tuple[int, int]] = []
        if len(ranked) >= 2 and rule == "best_worst":
            candidates = [(ranked[0], ranked[-1])]
        elif len(ranked) >= 2 and rule == "best_random":
            lower = [k for k in ranked[1:] if values[k] < values[ranked[0]]]
            candidates = [(ranked[0], rng.choice(lower) if lower else ranked[-1])]
        elif rule == "all_above_gap":
            candidates = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :]]
        elif rule not in ("best_worst", "best_random"):
            raise ValueError(f"unknown pair rule {rule!r}")
        made = 0
        for a, b in candidates:
            same = list(prompt_completions[a]) == list(prompt_completions[b])
            verdict = _verdict(a, b, values, same, min_gap)
            if verdict == "ok":
                out.append((p, a, b))
                made += 1
            else:
                setattr(counts, verdict, getattr(counts, verdict) + 1)
        counts.pairs += made
        counts.per_prompt.append(made)
        counts.prompts_without_pair += made == 0
    return out, counts
