"""The figures of ``check-data``'s data report, each a small pure function of per-pair numbers, and
the findings read off them: what the data predicts about preference training before a step runs.

Every threshold below is a named constant with its reason; a finding carries its evidence (the
figure and the pairs behind it), the paper, and the setting that addresses it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..losses import PairStats
from ..model.set_logps import PairLogps
from .metrics import bucket_label, edit_bucket, implicit_variants, ranking

WITHIN = (1, 2, 4, 8, 16)
"""The edit distances whose shares are reported: the likelihood-drift experiment's k."""
NEAR_IDENTICAL = 0.5
"""A pair is near-identical when its completions differ in at most this share of the longer one's
tokens. Calibrated on the likelihood-drift experiment (21–25-token completions): DPO lowered
log p(chosen) in 75–97% of the pairs at k = 1–8 (relative distance 0.04–0.38) and in 2% at k = 16
(0.64–0.76); the threshold sits between."""
NEAR_IDENTICAL_SHARE = 0.25
"""The DPOP suggestion fires when at least a quarter of the pairs are near-identical: the fall is
per pair, and below that most of the set trains as the few-token case does not."""
LENGTH_SIGNAL = 0.10
"""The length suggestion fires when the better length-only rule ('the longer is chosen', or 'the
shorter') is at least 10 points better than chance, and 3 standard errors from it."""
OFF_POLICY_NATS = 1.0
"""A completion is far off-policy when each of its tokens is, on average, at least 1 nat (a factor
e) less likely under the model than the model's own sample at that place would be (its entropy)."""
OFF_POLICY_SHARE = 0.5
"""The online-DPO suggestion fires when at least half of the completions are far off-policy."""
RANKING_LOW = 0.6
"""Below this, the reference's average log-prob (what generation follows) prefers chosen in few
more pairs than chance: the ranking finding fires."""
LABEL_NOISE = 0.2
"""The label-noise suggestion fires when the reward model disagrees with at least a fifth of the
labels (3 standard errors above 0 too)."""
WORST = 5
"""How many disputed pairs (and repeated or leaked ones) the report names."""
DRIFT_LAMBDA = 5.0
"""DPOP's λ that the likelihood-drift experiment found workable at β = 0.1 (docs/experiments.md):
it kept log p(chosen) up for k ≤ 8 and ranked 75–95% of the k = 1 pairs; the paper's λ = 50 left
them near chance after 2 epochs."""


def share(flags: Any) -> float:
    """Mean of 0/1 values; NaN for none."""
    values = np.asarray(flags, dtype=np.float64)
    return float(values.mean()) if values.size else math.nan


def standard_error(p: float, n: int) -> float:
    """Standard error of a share ``p`` measured on ``n`` pairs."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else math.nan


def relative_edit_distance(distance: int, chosen_length: int, rejected_length: int) -> float:
    """The edit distance as a share of the longer completion: 0 identical, 1 nothing in common.

    ``relative_edit_distance(1, 20, 20) == 0.05``; ``relative_edit_distance(3, 2, 3) == 1.0``."""
    return distance / max(chosen_length, rejected_length, 1)


def edit_figures(
    distances: Sequence[int], chosen_lengths: Sequence[int], rejected_lengths: Sequence[int]
) -> dict[str, Any]:
    """Token edit distance between chosen and rejected: its distribution (power-of-two buckets),
    the share of pairs differing in 1 to k tokens, and the share near-identical (differing in at
    most :data:`NEAR_IDENTICAL` of the longer completion; identical pairs are not, their gradient
    is zero)."""
    d = np.asarray(distances, dtype=np.int64)
    relative = np.array(
        [
            relative_edit_distance(*row)
            for row in zip(distances, chosen_lengths, rejected_lengths, strict=True)
        ]
    )
    buckets = Counter(edit_bucket(int(x)) for x in d)
    return {
        "pairs": int(d.size),
        "mean": float(d.mean()) if d.size else math.nan,
        "median": float(np.median(d)) if d.size else math.nan,
        "median_relative": float(np.median(relative)) if d.size else math.nan,
        "within": {str(k): share((d >= 1) & (d <= k)) for k in WITHIN},
        "near_identical": share((d >= 1) & (relative <= NEAR_IDENTICAL)),
        "buckets": [{"edit_distance": bucket_label(b), "pairs": buckets[b]} for b in sorted(buckets)],
    }


def length_figures(
    chosen_lengths: Sequence[int] | np.ndarray, rejected_lengths: Sequence[int] | np.ndarray
) -> dict[str, Any]:
    """Which side is longer, and how well length alone predicts the label: the rule 'the longer is
    chosen' scores ``chosen longer + ½ equal``; the better of it and its opposite is the signal."""
    c = np.asarray(chosen_lengths, dtype=np.float64)
    r = np.asarray(rejected_lengths, dtype=np.float64)
    longer, shorter, equal = share(c > r), share(c < r), share(c == r)
    accuracy = longer + equal / 2
    return {
        "pairs": int(c.size),
        "chosen_longer": longer,
        "rejected_longer": shorter,
        "equal": equal,
        "length_rule_accuracy": accuracy,
        "signal": max(accuracy, 1 - accuracy),
        "preferred": "longer" if accuracy >= 0.5 else "shorter",
        "standard_error": standard_error(accuracy, int(c.size)),
        "mean_chosen": float(c.mean()) if c.size else math.nan,
        "mean_rejected": float(r.mean()) if r.size else math.nan,
    }


def off_policy_excess(logps: torch.Tensor, entropy: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per completion, how many nats per token less likely it is under the model than the model's own
    sample would be: ``(−log π(y) − Σ_t H_t) / |y|``, ``H_t`` the entropy of the model's next-token
    distribution at token t. For a sample of the model itself it is 0 on average (``E[−log p] = H``
    at every step), so it measures off-policy-ness on the model's own scale."""
    return (-logps - entropy) / tokens.clamp(min=1)


def reference_figures(logps: PairLogps) -> dict[str, Any]:
    """The reference's view of the pairs: its ranking accuracy by average and by summed log-prob
    (:func:`~.metrics.ranking`, :func:`~.metrics.implicit_variants`), the log-prob gap, and the
    share of completions far off-policy (:func:`off_policy_excess` ≥ :data:`OFF_POLICY_NATS`)."""
    stats = PairStats(logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens)
    average = ranking(stats)["ranking/policy"]
    summed = implicit_variants(stats)["implicit/accuracy_ref_free_sum"]
    per_token = logps.chosen / logps.chosen_tokens - logps.rejected / logps.rejected_tokens
    out: dict[str, Any] = {
        "pairs": int(logps.chosen.numel()),
        "ranking_average": share(average),
        "ranking_sum": share(summed),
        "gap_sum": share(logps.chosen - logps.rejected),
        "gap_per_token": share(per_token),
        "mean_logp_per_token": share(
            torch.cat([logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens])
        ),
    }
    if logps.chosen_entropy is not None and logps.rejected_entropy is not None:
        excess = torch.cat(
            [
                off_policy_excess(logps.chosen, logps.chosen_entropy, logps.chosen_tokens),
                off_policy_excess(logps.rejected, logps.rejected_entropy, logps.rejected_tokens),
            ]
        )
        out["median_excess_nats"] = float(excess.median())
        out["far_off_policy"] = share(excess >= OFF_POLICY_NATS)
    return out


def reward_figures(
    chosen: Sequence[float], rejected: Sequence[float], wheres: Sequence[str], worst: int = WORST
) -> dict[str, Any]:
    """How often a reward model agrees with the labels (ties count half) — ``1 − agreement`` bounds
    the label noise from above, the reward model's own errors included — and the pairs it
    disputes most (largest ``r(rejected) − r(chosen)``), with their ``file:line``."""
    margin = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    agreement = share(margin > 0) + share(margin == 0) / 2
    disputed = [i for i in np.argsort(margin, kind="stable")[:worst] if margin[i] < 0]
    return {
        "pairs": int(margin.size),
        "agreement": agreement,
        "ties": share(margin == 0),
        "noise_estimate": 1 - agreement,
        "standard_error": standard_error(agreement, int(margin.size)),
        "mean_margin": float(margin.mean()) if margin.size else math.nan,
        "disputed": [
            {"where": wheres[i], "chosen": float(chosen[i]), "rejected": float(rejected[i])} for i in disputed
        ],
    }


def repeats(keys: np.ndarray) -> np.ndarray:
    """Positions whose key occurred at an earlier position."""
    _, first = np.unique(keys, return_index=True)
    seen_before = np.ones(keys.size, dtype=bool)
    seen_before[first] = False
    return np.flatnonzero(seen_before)


def duplicate_figures(
    prompts: np.ndarray, pairs: np.ndarray, swapped: np.ndarray, wheres: Sequence[str], worst: int = WORST
) -> dict[str, Any]:
    """Repeated prompts (several pairs per prompt is common; informational), repeated pairs (the same
    prompt, chosen and rejected again: trained twice), and contradicting pairs (a pair that appears
    elsewhere with chosen and rejected swapped), from per-pair keys (int64 digests)."""
    prompt_counts = Counter(prompts.tolist())
    repeated = repeats(pairs)
    contradicting = np.flatnonzero(np.isin(swapped, pairs) & (swapped != pairs))
    return {
        "pairs": int(pairs.size),
        "distinct_prompts": len(prompt_counts),
        "prompts_with_several_pairs": sum(n > 1 for n in prompt_counts.values()),
        "most_pairs_per_prompt": max(prompt_counts.values(), default=0),
        "repeated_pairs": int(repeated.size),
        "repeated_first": [wheres[i] for i in repeated[:worst]],
        "contradicting_pairs": int(contradicting.size),
        "contradicting_first": [wheres[i] for i in contradicting[:worst]],
    }


def leakage_figures(
    train: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray, np.ndarray],
    held_out_wheres: Sequence[str],
    worst: int = WORST,
) -> dict[str, Any]:
    """Held-out pairs that are also training pairs (either way round), and held-out prompts that
    the training data has. ``train``: (prompt keys, pair keys); ``held_out``: (prompt, pair,
    swapped keys)."""
    train_prompts, train_pairs = train
    prompts, pairs, swapped = held_out
    shared = np.flatnonzero(np.isin(pairs, train_pairs) | np.isin(swapped, train_pairs))
    return {
        "pairs": int(pairs.size),
        "shared_pairs": int(shared.size),
        "shared_first": [held_out_wheres[i] for i in shared[:worst]],
        "shared_prompts": share(np.isin(prompts, train_prompts)),
    }


# --------------------------------------------------------------------------- findings


@dataclass
class Finding:
    """One check of the report: whether it fires, the evidence, the paper, and what to set."""

    name: str
    fires: bool
    evidence: str
    paper: str = ""
    setting: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def edit_finding(edit: dict[str, Any], units: str) -> Finding:
    near = edit["near_identical"]
    evidence = (
        f"{percent(near)} of pairs are near-identical (chosen and rejected differ in at most half the "
        f"longer completion's {units}; median edit distance {edit['median']:g} {units.removesuffix('s') if edit['median'] == 1 else units}, "
        f"{edit['median_relative']:.2f} of the longer)"
    )
    fires = near >= NEAR_IDENTICAL_SHARE
    if fires:
        evidence += (
            ": DPO tends to lower log p(chosen) on such pairs while the margin grows (likelihood-drift "
            "experiment: −9.5 nats at 1 differing token of ~22, −3.1 at 8, +6.0 at 16)"
        )
    return Finding(
        "near-identical pairs",
        fires,
        evidence,
        "Pal et al. 2024, arXiv 2402.13228 (DPOP)",
        f"objective.loss=dpop objective.dpop_lambda={DRIFT_LAMBDA:g}",
    )


def length_finding(length: dict[str, Any], units: str) -> Finding:
    signal, error = length["signal"], length["standard_error"]
    fires = signal - 0.5 >= LENGTH_SIGNAL and signal - 0.5 >= 3 * error
    evidence = (
        f"chosen is longer in {percent(length['chosen_longer'])} of pairs, shorter in "
        f"{percent(length['rejected_longer'])}; 'the {length['preferred']} is chosen' predicts "
        f"{percent(signal)} of the labels (± {percent(error)}; mean {length['mean_chosen']:.1f} vs "
        f"{length['mean_rejected']:.1f} {units})"
    )
    if fires:
        evidence += ": a length shortcut the policy can learn instead of the preference"
    return Finding(
        "length signal",
        fires,
        evidence,
        "Singhal et al. 2023, arXiv 2310.03716; SimPO: Meng et al. 2024, arXiv 2405.14734; LD-DPO: Liu et al. "
        "2024, arXiv 2409.06411; length-controlled win rate: Dubois et al. 2024, arXiv 2404.04475",
        "objective.loss=simpo, or objective.ld_alpha=0.5; judge by a length-controlled win rate "
        "(preftune eval --samples reports sample lengths)",
    )


def ranking_finding(reference: dict[str, Any]) -> Finding:
    average = reference["ranking_average"]
    fires = average < RANKING_LOW
    evidence = (
        f"the reference's average log-prob ranks chosen first in {percent(average)} of pairs, its summed "
        f"log-prob in {percent(reference['ranking_sum'])}; gap log p(chosen) − log p(rejected) "
        f"{reference['gap_sum']:+.2f} nats ({reference['gap_per_token']:+.3f} per token)"
    )
    if fires:
        evidence += (
            ": generation follows the average log-prob, and DPO's reward (a summed log-ratio) does not "
            "train that ranking directly"
        )
    return Finding(
        "reference ranking",
        fires,
        evidence,
        "Meng et al. 2024, arXiv 2405.14734 (SimPO)",
        "hold out pairs (data.eval_path) and watch eval_ranking/policy while training; "
        "objective.loss=simpo rewards the average log-prob itself",
    )


def off_policy_finding(reference: dict[str, Any]) -> Finding:
    far = reference["far_off_policy"]
    fires = far >= OFF_POLICY_SHARE
    evidence = (
        f"{percent(far)} of completions are far off-policy (≥ {OFF_POLICY_NATS:g} nat per token less likely "
        f"than the model's own samples; median {reference['median_excess_nats']:+.2f} nats per token)"
    )
    if fires:
        evidence += ": the pairs were written by another policy than the one trained"
    return Finding(
        "off-policy completions",
        fires,
        evidence,
        "Xiong et al. 2024, arXiv 2405.07863 (online iterative DPO); Rafailov et al. 2023, arXiv 2305.18290 §4",
        "preftune online (the policy's own samples, labelled by a reward model), or first objective.loss=sft "
        "on the chosen completions so the reference writes like the data",
    )


def reward_finding(reward: dict[str, Any], name: str) -> Finding:
    noise, error = reward["noise_estimate"], reward["standard_error"]
    fires = noise >= LABEL_NOISE and noise >= 3 * error
    evidence = (
        f"{name} agrees with {percent(reward['agreement'])} of the labels: at most {percent(noise)} "
        f"label noise (± {percent(error)}; its own errors included)"
    )
    if reward["disputed"]:
        evidence += "; most disputed: " + ", ".join(d["where"] for d in reward["disputed"])
    if noise > 0.5 + 3 * error:
        setting = "check that chosen and rejected are not swapped (data.chosen_field, data.rejected_field)"
    else:
        epsilon = min(round(noise * 20) / 20, 0.4)
        setting = f"objective.loss=robust objective.label_smoothing={epsilon:g}, or drop the disputed pairs"
    return Finding("label noise", fires, evidence, "rDPO: Chowdhury et al. 2024, arXiv 2403.00409", setting)


def duplicates_finding(duplicates: dict[str, Any], identical: int) -> Finding:
    repeated, contradicting = duplicates["repeated_pairs"], duplicates["contradicting_pairs"]
    fires = bool(repeated or contradicting or identical)
    first = duplicates["repeated_first"] + duplicates["contradicting_first"]
    evidence = (
        f"{repeated} repeated pairs, {contradicting} pairs contradicted by a swapped copy, {identical} "
        f"identical pairs; {duplicates['distinct_prompts']} distinct prompts, "
        f"{duplicates['prompts_with_several_pairs']} with several pairs (up to "
        f"{duplicates['most_pairs_per_prompt']})"
    ) + (f"; first: {', '.join(first)}" if first else "")
    return Finding(
        "duplicates",
        fires,
        evidence,
        "",
        "remove repeated and contradicting pairs; data.identical_pairs=drop",
    )


def leakage_finding(leakage: dict[str, Any], name: str) -> Finding:
    shared = leakage["shared_pairs"]
    evidence = (
        f"{shared} of {leakage['pairs']} pairs of {name} are training pairs; "
        f"{percent(leakage['shared_prompts'])} of its prompts are training prompts"
    ) + (f"; first: {', '.join(leakage['shared_first'])}" if shared else "")
    return Finding("held-out leakage", shared > 0, evidence, "", f"remove the shared pairs from {name}")


def findings(figures: dict[str, Any]) -> list[Finding]:
    """Every check the figures allow, in the report's order."""
    units, out = figures["units"], []
    if figures["edit_distance"]["pairs"]:
        out.append(edit_finding(figures["edit_distance"], units))
    if figures["length"]["pairs"]:
        out.append(length_finding(figures["length"], units))
    if "reference" in figures:
        out.append(ranking_finding(figures["reference"]))
        if "far_off_policy" in figures["reference"]:
            out.append(off_policy_finding(figures["reference"]))
    if "reward" in figures:
        out.append(reward_finding(figures["reward"], figures["reward_name"]))
    out.append(duplicates_finding(figures["duplicates"], figures["identical"]))
    if "leakage" in figures:
        out.append(leakage_finding(figures["leakage"], figures["eval_data"]))
    return out
