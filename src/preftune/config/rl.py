"""Config sections of the recipes that sample from the policy: ``rollout`` (how completions are
generated), ``online`` (iterative DPO with a reward model) and ``ppo`` (RLHF with PPO).

Part of the ground floor beside :mod:`preftune.config`, which puts these sections into
:class:`~preftune.config.RunConfig`; it imports nothing of preftune but its errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .coerce import need

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
    """Sequences per ``generate`` call (a prompt sampled K times counts K times)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the reward of a completion that did not end with EOS (TRL's name); None: off."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """``transformers``: ``model.generate`` on the training model. ``vllm``: one vLLM engine on the
    training GPU, the policy's weights copied in before each rollout (``pip install vllm``)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory the vLLM engine may take (its weights and KV cache)."""
    vllm_sleep: bool = True
    """Release the vLLM engine's GPU memory between rollouts, for training to use."""


@dataclass
class OnlineConfig:
    """Online (iterative) DPO: each round samples from the current policy, scores the samples
    with a reward model or function, builds pairs, and trains one round of the offline recipe."""

    prompts_per_round: int | None = None
    """Each round takes the next N prompts (wrapping around), as RLHFlow's rounds take fresh slices
    of the prompt set; None: every round samples every prompt."""
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


@dataclass
class PPOConfig:
    """PPO with a KL penalty (Ouyang et al. 2022; the details of Huang et al. 2024, arXiv 2403.17031).
    Each step samples one completion for each of ``rollouts_per_step`` prompts, scores it, and makes
    ``ppo_epochs`` passes of ``num_mini_batches`` optimizer updates over those rollouts. Defaults are TRL's."""

    steps: int = 100
    """PPO steps: each is one rollout batch and its updates."""
    rollouts_per_step: int = 64
    """Prompts sampled per step (one completion each; drawn in a fresh seeded order every pass)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer updates per pass (each on rollouts_per_step / num_mini_batches rollouts, taken in
    forwards of ``train.batch_size`` sequences)."""
    kl_coef: float = 0.05
    """β of the per-token penalty −β·KL_t folded into the reward (the initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate: k1 = log π/π_ref; k3 = (r − 1) − log r with r = π_ref/π (never negative)."""
    target_kl: float | None = None
    """Adaptive coefficient (Ziegler et al. 2019): steer the rollouts' KL (nats per sequence) to this;
    None: fixed ``kl_coef``."""
    kl_horizon: int = 10_000
    """Experience over which the adaptive coefficient moves by the (clipped) relative KL error."""
    gamma: float = 1.0
    """Discount γ of the generalized advantage estimate."""
    lam: float = 0.95
    """λ of the generalized advantage estimate (1: Monte Carlo returns, 0: one-step TD)."""
    cliprange: float = 0.2
    """ε of the clipped policy ratio, clip(r, 1 − ε, 1 + ε)."""
    cliprange_value: float = 0.2
    """Clip the value prediction to within this of its rollout-time value."""
    vf_coef: float = 0.1
    """Weight of the value loss beside the policy loss."""
    whiten_advantages: bool = True
    """Normalize the rollout batch's advantages to mean 0 and variance 1."""
    value_model: str = "auto"
    """The critic: ``reward`` (a copy of the reward model, head and all), ``policy`` (the policy's
    backbone with a new zero-initialized head), a folder, or ``auto``: the reward model when the
    reward is one that reads the policy's vocabulary, else the policy."""


def check_rollout(rollout: RolloutConfig) -> None:
    """Ranges of the rollout settings. Raises :class:`ConfigError` naming the key."""
    need(rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(
        math.isfinite(rollout.temperature) and rollout.temperature >= 0,
        "rollout.temperature",
        f"must be >= 0 (0: greedy), got {rollout.temperature}",
    )
    need(rollout.top_k >= 0, "rollout.top_k", "must be >= 0 (0: off)")
    need(0 < rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {rollout.top_p}")
    need(rollout.batch_size >= 1, "rollout.batch_size", "must be >= 1")
    need(
        0 < rollout.vllm_gpu_memory_utilization <= 1,
        "rollout.vllm_gpu_memory_utilization",
        f"must be in (0, 1], got {rollout.vllm_gpu_memory_utilization}",
    )
    penalty = rollout.missing_eos_penalty
    need(
        penalty is None or (math.isfinite(penalty) and penalty >= 0),
        "rollout.missing_eos_penalty",
        f"must be >= 0 (or null), got {penalty}",
    )


def check_online(online: OnlineConfig) -> None:
    need(
        online.prompts_per_round is None or online.prompts_per_round >= 1,
        "online.prompts_per_round",
        "must be >= 1",
    )
    need(online.rounds >= 1, "online.rounds", "must be >= 1")
    need(online.samples_per_prompt >= 2, "online.samples_per_prompt", "must be >= 2 (a pair needs two)")
    need(
        math.isfinite(online.min_gap) and online.min_gap >= 0,
        "online.min_gap",
        f"must be >= 0, got {online.min_gap}",
    )


def check_ppo(ppo: PPOConfig) -> None:
    """Ranges of the PPO settings."""
    for key in ("steps", "rollouts_per_step", "ppo_epochs", "num_mini_batches", "kl_horizon"):
        need(getattr(ppo, key) >= 1, f"ppo.{key}", "must be >= 1")
    need(
        ppo.rollouts_per_step % ppo.num_mini_batches == 0,
        "ppo.num_mini_batches",
        f"must divide ppo.rollouts_per_step ({ppo.rollouts_per_step}), got {ppo.num_mini_batches}",
    )
    for key in ("kl_coef", "gamma", "lam", "cliprange", "cliprange_value", "vf_coef"):
        value = getattr(ppo, key)
        need(math.isfinite(value) and value >= 0, f"ppo.{key}", f"must be >= 0, got {value}")
    for key in ("gamma", "lam"):
        need(getattr(ppo, key) <= 1, f"ppo.{key}", f"must be in [0, 1], got {getattr(ppo, key)}")
    need(
        ppo.target_kl is None or ppo.target_kl > 0, "ppo.target_kl", "must be > 0 (or null: a fixed kl_coef)"
    )
