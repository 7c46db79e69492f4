"""``preftune eval``: did the alignment work, on the user's own models and preference sets?

For each named set of pairs (``id``, ``prompt_shift``, ``response_shift``, …):

* DPO's implicit reward ``β log π/π_ref`` as a reward model ("DPO-RM"): accuracy and margin,
  with RewardBench's variants (per-token, reference-free sum / mean / L2 norm), beside an
  explicit reward model or function ("EX-RM") when one is given (Lin et al. 2024, arXiv 2409.03650);
* ranking consistency: the mean log-prob ranks chosen first, under the policy and under the
  reference (Meng et al. 2024, arXiv 2405.14734);
* likelihood drift ``log π − log π_ref`` of chosen and rejected, and the share of pairs whose
  chosen likelihood fell, overall and by token edit distance (Pal et al. 2024, arXiv 2402.13228);
* with ``samples``: K samples per prompt from policy and reference, the KL(π‖π_ref) estimate,
  the samples' rewards and the policy's win rate.

Every per-pair figure comes from :mod:`preftune.evaluation.metrics`, the functions the training loop logs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..config import DataConfig
from ..data import PreferenceExample, Text, TokenizedPair, parse_example, prepare_pairs, read_records
from ..errors import ConfigError, DataError, ModelLoadError
from ..generation.aggregate import Scores, score_detail
from ..generation.scoring import Scorer
from ..losses import PairStats
from ..model.set_logps import PairLogps, pair_logps
from .metrics import (
    bucket_label,
    drift,
    edit_bucket,
    edit_distance,
    implicit_variants,
    norm_accuracy,
    ranking,
)
from .samples import sample_report
from .settings import EvalSettings


@dataclass
class EvalSet:
    """One named set of preference pairs: token ids and, for reward scoring, the texts."""

    name: str
    source: str
    pairs: list[TokenizedPair]
    examples: list[PreferenceExample]
    """Aligned with ``pairs``."""


# --------------------------------------------------------------------------- inputs


def parse_data_specs(values: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=FILE`` items (a bare ``FILE`` is named after its stem); names must be unique."""
    specs: list[tuple[str, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).stem, value
        if not name or not path:
            raise DataError(f"--data {value}: expected NAME=FILE (e.g. --data heldout=pairs.jsonl)")
        if any(name == seen for seen, _ in specs):
            raise DataError(f"--data {value}: the set name '{name}' is used twice")
        specs.append((name, path))
    if not specs:
        raise DataError("--data: give at least one preference set, as NAME=FILE")
    return specs


def load_sets(specs: Sequence[tuple[str, Any]], tokenizer: Any, cfg: DataConfig) -> list[EvalSet]:
    """Read, validate and tokenize every set before any model loads (errors name ``file:line``)."""
    sets = []
    for name, source in specs:
        pairs, _ = prepare_pairs(source, tokenizer, cfg, cfg.split, progress=False)
        records = dict(enumerate(read_records(source, cfg.split)))
        examples = [parse_example(records[p.index][1], p.where, cfg) for p in pairs]
        sets.append(
            EvalSet(name, str(source) if isinstance(source, str | Path) else name, list(pairs), examples)
        )
    return sets


def check_tokenizers(policy: Any, reference: Any, reference_name: str) -> None:
    """Log-ratios compare token ids: the policy and the reference must share a vocabulary."""
    ours, theirs = policy.get_vocab(), reference.get_vocab()
    if ours != theirs:
        differ = sum(theirs.get(token) != index for token, index in ours.items())
        differ += sum(token not in ours for token in theirs)
        raise ModelLoadError(
            f"--reference {reference_name}: its tokenizer differs from the policy's "
            f"({len(theirs)} vs {len(ours)} tokens, {differ} that differ); log-ratios need the same vocabulary"
        )
    for special in ("eos_token", "bos_token"):
        if getattr(policy, special) != getattr(reference, special):
            raise ModelLoadError(
                f"--reference {reference_name}: its {special} is {getattr(reference, special)!r}, "
                f"the policy's is {getattr(policy, special)!r}"
            )


def pair_stats_of(policy: PairLogps, reference: PairLogps | None) -> PairStats:
    return PairStats(
        policy.chosen,
        policy.rejected,
        policy.chosen_tokens,
        policy.rejected_tokens,
        None if reference is None else reference.chosen,
        None if reference is None else reference.rejected,
    )


# --------------------------------------------------------------------------- one set


def _mean(values: Tensor | None) -> float | None:
    return None if values is None or values.numel() == 0 else values.double().mean().item()


def set_report(
    pairs: Sequence[TokenizedPair],
    policy: PairLogps,
    reference: PairLogps | None,
    rewards: SetRewards | tuple[list[float], list[float]] | None,
    beta: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The set's summary (``eval.json``) and its per-pair rows, from per-pair statistics."""
    stats = pair_stats_of(policy, reference)
    per_pair = {**drift(stats), **ranking(stats), **implicit_variants(stats)}
    per_pair["implicit/accuracy_ref_free_norm"] = norm_accuracy(policy.chosen_norm, policy.rejected_norm)
    logratio_margin = None
    if reference is not None:
        logratio_margin = per_pair["drift/chosen"] - per_pair["drift/rejected"]
    ex_margin = None
    if rewards is not None:
        chosen_rewards, rejected_rewards = (torch.tensor(r, dtype=torch.float64) for r in rewards[:2])
        ex_margin = chosen_rewards - rejected_rewards
    summary: dict[str, Any] = {
        "pairs": len(pairs),
        "dpo_rm_accuracy": _mean(per_pair.get("implicit/accuracy")),
        "dpo_rm_margin": None if logratio_margin is None else beta * logratio_margin.mean().item(),
        "dpo_rm_accuracy_length_normalized": _mean(per_pair.get("implicit/accuracy_length_normalized")),
        "dpo_rm_accuracy_ref_free_sum": _mean(per_pair["implicit/accuracy_ref_free_sum"]),
        "dpo_rm_accuracy_ref_free_avg": _mean(per_pair["implicit/accuracy_ref_free_avg"]),
        "dpo_rm_accuracy_ref_free_norm": _mean(per_pair["implicit/accuracy_ref_free_norm"]),
        "ex_rm_accuracy": None if ex_margin is None else (ex_margin > 0).double().mean().item(),
        "ex_rm_margin": _mean(ex_margin),
        "ranking_consistency_policy": _mean(per_pair["ranking/policy"]),
        "ranking_consistency_reference": _mean(per_pair.get("ranking/reference")),
        "chosen_logp_drift": _mean(per_pair.get("drift/chosen")),
        "rejected_logp_drift": _mean(per_pair.get("drift/rejected")),
        "chosen_fell_share": _mean(per_pair.get("drift/chosen_fell")),
        "mean_edit_distance": None,
        "drift_by_edit_distance": [],
    }
    if isinstance(rewards, SetRewards) and rewards.members is not None:
        summary |= rewards.member_figures()
    # Token edit distance between the two completions (Pal et al.: few differing tokens is the
    # case where DPO most often lowers the chosen likelihood).
    distances = [edit_distance(p.chosen_ids, p.rejected_ids) for p in pairs]
    summary["mean_edit_distance"] = sum(distances) / len(distances)
    rows = []
    for i, pair in enumerate(pairs):
        row: dict[str, Any] = {"index": pair.index, "where": pair.where, "edit_distance": distances[i]}
        row["logp_chosen"], row["logp_rejected"] = policy.chosen[i].item(), policy.rejected[i].item()
        row["tokens_chosen"] = int(policy.chosen_tokens[i])
        row["tokens_rejected"] = int(policy.rejected_tokens[i])
        if reference is not None:
            row["chosen_logp_drift"] = per_pair["drift/chosen"][i].item()
            row["rejected_logp_drift"] = per_pair["drift/rejected"][i].item()
        if rewards is not None:
            row["reward_chosen"], row["reward_rejected"] = rewards[0][i], rewards[1][i]
        rows.append(row)
    if reference is not None:
        summary["drift_by_edit_distance"] = drift_by_bucket(rows)
    return summary, rows


def drift_by_bucket(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chosen / rejected drift and the chosen-fell share per power-of-two edit-distance bucket."""
    buckets: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        buckets[edit_bucket(row["edit_distance"])].append(row)
    out = []
    for bucket in sorted(buckets):
        members = buckets[bucket]
        chosen = [r["chosen_logp_drift"] for r in members]
        out.append(
            {
                "edit_distance": bucket_label(bucket),
                "low": bucket[0],
                "high": bucket[1],
                "pairs": len(members),
                "chosen_logp_drift": sum(chosen) / len(members),
                "rejected_logp_drift": sum(r["rejected_logp_drift"] for r in members) / len(members),
                "chosen_fell_share": sum(c < 0 for c in chosen) / len(members),
            }
        )
    return out


# --------------------------------------------------------------------------- every set


class SetRewards(NamedTuple):
    """The explicit reward of a set's chosen and rejected completions (an ensemble's aggregate),
    and with an ensemble each member's (``members[0][i][k]``: chosen of pair i, member k)."""

    chosen: list[float]
    rejected: list[float]
    members: tuple[list[list[float]], list[list[float]]] | None = None

    def member_figures(self) -> dict[str, Any]:
        """Each member's accuracy (chosen above rejected), the weakest and best, and the members'
        disagreement (their standard deviation, mean over the completions)."""
        assert self.members is not None
        chosen, rejected = self.members
        accuracy = [
            sum(c[k] > r[k] for c, r in zip(chosen, rejected, strict=True)) / max(len(chosen), 1)
            for k in range(len(chosen[0]) if chosen else 0)
        ]
        return {
            "ex_rm_member_accuracy": accuracy,
            "ex_rm_member_accuracy_min": min(accuracy, default=None),
            "ex_rm_member_accuracy_max": max(accuracy, default=None),
            "ex_rm_disagreement": Scores([], chosen + rejected).disagreement(),
        }


def score_sets(scorer: Scorer, sets: Sequence[EvalSet]) -> dict[str, SetRewards]:
    """The explicit reward of every pair's chosen and rejected, per set (an ensemble's aggregate,
    and its members'). Run before any policy forward pass, so a reward function that raises or
    answers in the wrong shape stops at once."""
    out = {}
    for eval_set in sets:
        prompts = [e.prompt for e in eval_set.examples]
        completions = [e.chosen for e in eval_set.examples] + [e.rejected for e in eval_set.examples]
        scores = score_detail(scorer, prompts + prompts, completions)
        n, members = len(prompts), scores.members
        several = members is not None and bool(members) and len(members[0]) > 1
        out[eval_set.name] = SetRewards(
            scores.rewards[:n],
            scores.rewards[n:],
            (members[:n], members[n:]) if several and members is not None else None,
        )
    return out


@dataclass
class EvalResult:
    summary: dict[str, Any]
    """What ``eval.json`` holds: the settings and, per set, every figure."""
    per_pair: dict[str, list[dict[str, Any]]]
    """Per set, one row per pair (edit distance, log-probs, drift, rewards)."""


def evaluate(
    policy: nn.Module,
    tokenizer: Any,
    sets: Sequence[EvalSet],
    reference: nn.Module | None = None,
    scorer: Scorer | None = None,
    settings: EvalSettings | None = None,
    *,
    rewards: dict[str, SetRewards] | dict[str, tuple[list[float], list[float]]] | None = None,
    names: dict[str, str | None] | None = None,
) -> EvalResult:
    """Every figure of ``preftune eval`` for models already in memory (see the module docstring).

    ``rewards``: the scorer's rewards of each set's chosen and rejected, when already computed
    (:func:`score_sets`); the scorer still scores the samples. ``names``: the models' names,
    for the summary. ``settings``: :class:`EvalSettings`' defaults when not given."""
    settings = settings or EvalSettings()
    if settings.samples and reference is None:
        raise ConfigError("--samples: the KL estimate and the win rate need a reference (--reference)")
    if scorer is not None and rewards is None:
        rewards = score_sets(scorer, sets)
    summary: dict[str, Any] = {"beta": settings.beta, **(names or {}), "sets": {}}
    per_pair: dict[str, list[dict[str, Any]]] = {}
    for eval_set in sets:
        name = eval_set.name
        ours = _pair_logps(policy, tokenizer, eval_set, settings, f"{name}: policy")
        theirs = None
        if reference is not None:
            theirs = _pair_logps(reference, tokenizer, eval_set, settings, f"{name}: reference")
        set_rewards = None if rewards is None else rewards[name]
        report, per_pair[name] = set_report(eval_set.pairs, ours, theirs, set_rewards, settings.beta)
        report["source"] = eval_set.source
        if settings.samples and reference is not None:
            prompts: dict[tuple[int, ...], Text] = {}
            for pair, example in zip(eval_set.pairs, eval_set.examples, strict=True):
                prompts.setdefault(tuple(pair.prompt_ids), example.prompt)
            report["samples"] = sample_report(policy, reference, tokenizer, prompts, scorer, settings, name)
        summary["sets"][name] = report
    return EvalResult(summary, per_pair)


def _pair_logps(
    model: nn.Module, tokenizer: Any, eval_set: EvalSet, settings: EvalSettings, desc: str
) -> PairLogps:
    """The set's per-pair log-probs under ``model``, batched as ``settings`` say."""
    pad = tokenizer.pad_token_id
    return pair_logps(
        model, eval_set.pairs, pad, settings.batch_size, settings.progress, desc, settings.layout
    )
