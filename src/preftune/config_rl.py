"""Config sections of the recipes that sample from the policy: ``rollout`` (how completions are
generated) and ``online`` (iterative DPO with a reward model).

Part of the ground floor beside :mod:`preftune.config`, which puts these sections into
:class:`~preftune.config.RunConfig`; it imports nothing of preftune but its errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError

PAIR_RULES = ("best_worst", "best_random", "all_above_gap")


@dataclass
class RolloutConfig:
    """Generation from the current policy: batched, left-padded, with the KV cache, under
    ``no_grad`` in eval mode; each completion ends at EOS or after ``max_new_tokens``."""

    max_new_tokens: int = 64
    """Length limit of a completion in tokens (a completion cut there has no EOS)."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy decoding."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1: all)."""
    batch_size: int = 16
    """Prompts per ``generate`` call (each expands to its samples)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of a completion that did not end with EOS (TRL's name); None: off."""


@dataclass
class OnlineConfig:
    """Online (iterative) DPO: each round samples from the current policy, scores the samples
    with a reward model or function, builds pairs, and trains one round of the offline recipe."""

    prompts: str = ""
    """Prompts: any file ``train`` reads with a ``prompt`` field (text or chat messages)."""
    prompts_split: str = "train"
    """Split of a hub dataset of prompts."""
    max_prompts: int | None = None
    """Use only the first N prompts (None: all)."""
    prompts_per_round: int | None = None
    """Each round takes the next N prompts (wrapping around), as RLHFlow's rounds take fresh slices
    of the prompt set; None: every round samples every prompt."""
    reward: str = ""
    """A reward-model folder, or a function ``module:function`` / ``file.py:function``."""
    reward_batch_size: int = 16
    """Completions per reward-model forward."""
    rounds: int = 3
    """Rounds of sample -> score -> pair -> train."""
    samples_per_prompt: int = 4
    """Completions generated per prompt each round (K >= 2)."""
    pair_rule: Literal["best_worst", "best_random", "all_above_gap"] = "best_worst"
    """How a prompt's scored samples become pairs: the best against the worst; the best against a
    random lower-scored one; or every pair whose rewards differ by at least ``min_gap``."""
    min_gap: float = 0.0
    """Smallest reward difference a pair may have (ties, a difference of 0, are always dropped)."""
    reference: Literal["round", "initial"] = "round"
    """The reference of each round: the policy the round starts from, or the initial model."""
    final_samples: bool = True
    """After the last round, sample the final policy too (its reward, KL and EOS rate)."""


def check_rl(rollout: RolloutConfig, online: OnlineConfig) -> None:
    """Ranges of the rollout and online settings. Raises :class:`ConfigError` naming the key."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    need(rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(
        math.isfinite(rollout.temperature) and rollout.temperature >= 0,
        "rollout.temperature",
        f"must be >= 0 (0: greedy), got {rollout.temperature}",
    )
    need(rollout.top_k >= 0, "rollout.top_k", "must be >= 0 (0: off)")
    need(0 < rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {rollout.top_p}")
    need(rollout.batch_size >= 1, "rollout.batch_size", "must be >= 1")
    penalty = rollout.missing_eos_penalty
    need(
        penalty is None or (math.isfinite(penalty) and penalty >= 0),
        "rollout.missing_eos_penalty",
        f"must be >= 0 (or null), got {penalty}",
    )
    need(online.max_prompts is None or online.max_prompts >= 1, "online.max_prompts", "must be >= 1")
    need(
        online.prompts_per_round is None or online.prompts_per_round >= 1,
        "online.prompts_per_round",
        "must be >= 1",
    )
    need(online.reward_batch_size >= 1, "online.reward_batch_size", "must be >= 1")
    need(online.rounds >= 1, "online.rounds", "must be >= 1")
    need(online.samples_per_prompt >= 2, "online.samples_per_prompt", "must be >= 2 (a pair needs two)")
    need(
        math.isfinite(online.min_gap) and online.min_gap >= 0,
        "online.min_gap",
        f"must be >= 0, got {online.min_gap}",
    )
