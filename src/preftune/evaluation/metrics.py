"""Whether preference training worked: per-pair metrics, averaged over pairs by whoever sums them.

The training loop logs them (its evaluation with an ``eval_`` prefix), the demo reports
them, and evaluation commands compute them on any set of pairs. Each function takes the
per-sequence statistics of B pairs (:class:`~preftune.losses.PairStats`) and returns
``[B]`` tensors; the figure reported is their mean.

* ``rewards/*``, ``logps/*``: the objective's rewards under TRL's names.
* ``implicit/accuracy``: DPO's implicit reward ``β log π/π_ref`` ranks chosen first (for any β > 0).
* ``drift/chosen``, ``drift/rejected``: ``log π − log π_ref`` of each side; ``drift/chosen_fell``:
  the share of pairs whose chosen likelihood fell below the reference's (Pal et al. 2024,
  arXiv 2402.13228: DPO can lower it while the margin grows).
* ``ranking/policy``, ``ranking/reference``: the average log-prob (the generation metric)
  ranks chosen first (Meng et al. 2024, arXiv 2405.14734: after DPO, often only about half do).
* ``implicit/*`` variants, as RewardBench scores DPO models (Lambert et al. 2024, arXiv 2403.13787):
  per-token log-ratios, and the reference-free sum / mean / L2 norm of the policy's log-probs.
* :func:`edit_distance` and :func:`edit_bucket`: how many tokens chosen and rejected differ in
  (Pal et al.: the chosen likelihood falls most when they differ in few).
* :func:`sampled_kl`: KL(π‖π_ref) from samples of π.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from ..losses import LossOutput, PairStats


def reward_metrics(stats: PairStats, out: LossOutput) -> dict[str, Tensor]:
    """The objective's rewards and the policy log-probs, per pair, under TRL's names."""
    return {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": stats.chosen_logps.detach(),
        "logps/rejected": stats.rejected_logps.detach(),
    }


def average_logps(logps: Tensor, tokens: Tensor) -> Tensor:
    """Per-token mean log-prob ``π / |y|``: what sampling and SimPO's reward rank by."""
    return logps / tokens.clamp(min=1)


def ranking(stats: PairStats) -> dict[str, Tensor]:
    """1 where the average log-prob ranks chosen above rejected, under the policy (and reference)."""
    out = {
        "ranking/policy": (
            average_logps(stats.chosen_logps, stats.chosen_tokens)
            > average_logps(stats.rejected_logps, stats.rejected_tokens)
        ).float()
    }
    if stats.ref_chosen_logps is not None and stats.ref_rejected_logps is not None:
        out["ranking/reference"] = (
            average_logps(stats.ref_chosen_logps, stats.chosen_tokens)
            > average_logps(stats.ref_rejected_logps, stats.rejected_tokens)
        ).float()
    return out


def drift(stats: PairStats) -> dict[str, Tensor]:
    """``log π − log π_ref`` of chosen and rejected, DPO's implicit-reward accuracy, and whether
    the chosen likelihood fell. Empty without the reference's statistics."""
    if stats.ref_chosen_logps is None or stats.ref_rejected_logps is None:
        return {}
    chosen = (stats.chosen_logps - stats.ref_chosen_logps).detach()
    rejected = (stats.rejected_logps - stats.ref_rejected_logps).detach()
    return {
        "implicit/accuracy": (chosen > rejected).float(),
        "drift/chosen": chosen,
        "drift/rejected": rejected,
        "drift/chosen_fell": (chosen < 0).float(),
    }


def preference_metrics(stats: PairStats, out: LossOutput) -> dict[str, Tensor]:
    """Everything above for one batch of pairs."""
    return {**reward_metrics(stats, out), **drift(stats), **ranking(stats)}


def implicit_variants(stats: PairStats) -> dict[str, Tensor]:
    """Other ways to read a DPO policy as a reward model, 1 where chosen is ranked first.

    * ``implicit/accuracy_length_normalized``: the per-token log-ratio
      ``(π − π_ref) / |y|`` (needs the reference);
    * ``implicit/accuracy_ref_free_sum``: ``π_w > π_l`` (RewardBench's reference-free ``sum``);
    * ``implicit/accuracy_ref_free_avg``: ``π_w/|y_w| > π_l/|y_l|`` (its ``avg``; the same
      figure as ``ranking/policy``).
    RewardBench's default reference-free score, the L2 norm, is :func:`norm_accuracy`.
    """
    out = {
        "implicit/accuracy_ref_free_sum": (stats.chosen_logps > stats.rejected_logps).float(),
        "implicit/accuracy_ref_free_avg": ranking(stats)["ranking/policy"],
    }
    if stats.ref_chosen_logps is not None and stats.ref_rejected_logps is not None:
        chosen = average_logps(stats.chosen_logps - stats.ref_chosen_logps, stats.chosen_tokens)
        rejected = average_logps(stats.rejected_logps - stats.ref_rejected_logps, stats.rejected_tokens)
        out["implicit/accuracy_length_normalized"] = (chosen > rejected).float()
    return out


def norm_accuracy(chosen_norms: Tensor, rejected_norms: Tensor) -> Tensor:
    """RewardBench's default reference-free DPO score ``−‖log p(y_t)‖₂``: 1 where it ranks chosen
    first, i.e. where chosen's per-token log-probs have the smaller norm."""
    return (chosen_norms < rejected_norms).float()


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance: the fewest token insertions, deletions and substitutions from a to b.

    ``edit_distance([5, 6, 7], [5, 9, 7]) == 1``; ``edit_distance([1, 2], [2]) == 1``.
    A shared prefix and suffix are stripped first; the rest is the textbook dynamic programme,
    one row at a time, with the row's insertion chain as a running minimum
    (``d[j] = min_k≤j (base[k] + j − k)``), so a row is a few numpy operations.
    """
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[len(a) - 1 - end] == b[len(b) - 1 - end]:
        end += 1
    x = np.asarray(a[start : len(a) - end], dtype=np.int64)
    y = np.asarray(b[start : len(b) - end], dtype=np.int64)
    if len(x) == 0 or len(y) == 0:
        return int(max(len(x), len(y)))
    columns = np.arange(len(y) + 1)
    row = columns.copy()
    for i, token in enumerate(x, start=1):
        base = np.empty_like(row)
        base[0] = i
        # deletion (row above + 1) or substitution (diagonal + mismatch)
        base[1:] = np.minimum(row[1:] + 1, row[:-1] + (y != token))
        row = np.minimum.accumulate(base - columns) + columns  # insertions along the row
    return int(row[-1])


def edit_bucket(distance: int) -> tuple[int, int]:
    """The power-of-two bucket ``(low, high)`` holding ``distance``: 0, 1, 2, 3–4, 5–8, 9–16, …"""
    if distance <= 2:
        return distance, distance
    high = 2 ** math.ceil(math.log2(distance))
    return high // 2 + 1, high


def bucket_label(bucket: tuple[int, int]) -> str:
    low, high = bucket
    return str(low) if low == high else f"{low}–{high}"


def sampled_kl(policy_logps: Tensor, reference_logps: Tensor) -> tuple[float, float]:
    """KL(π‖π_ref) in nats per sequence from ``[K]`` samples ``y ~ π``: the mean of
    ``log π(y) − log π_ref(y)``, and its standard error. Unbiased, since
    ``E_π[log π/π_ref] = KL(π‖π_ref)``; single samples can be negative, the mean converges.
    For samples cut at a length limit it is the KL between the two distributions of cut
    sequences (each token's probability is still the model's)."""
    ratios = (policy_logps - reference_logps).double()
    count = ratios.numel()
    if count == 0:
        return math.nan, math.nan
    stderr = ratios.std().item() / math.sqrt(count) if count > 1 else math.nan
    return ratios.mean().item(), stderr
