"""PPO with a KL penalty, as small pure functions of per-token tensors.

Every tensor is ``[S, L]``: S sampled completions, each token ``t`` of completion ``s`` at
``[s, t]`` from column 0, zero-padded on the right, with ``mask`` 1 on real tokens. Nothing here
knows about models or batches; :mod:`preftune.recipes.ppo` computes the log-probs and values
and calls these, in this order:

    kl        = kl_penalty(logps, ref_logps, estimator)        per-token KL(π‖π_ref) estimate
    rewards   = token_rewards(scores, kl, mask, kl_coef)       −β·KL_t, plus the score at the last token
    A, R      = gae(rewards, values, mask, γ, λ)               advantages and returns
    A         = whiten(A, mask)                                 (optional)
    loss      = policy_loss(...) + vf_coef · value_loss(...)   per token, averaged over the tokens

The details follow "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024,
arXiv 2403.17031) and TRL's PPO trainer, which they describe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token estimates of KL(π‖π_ref) at tokens sampled from π (Schulman 2020, "Approximating
    KL Divergence"), with ``log r = log π_ref(y_t) − log π(y_t)``:

    * ``k1 = −log r = log π − log π_ref``: unbiased, single values can be negative;
    * ``k3 = (r − 1) − log r``: also unbiased (``E_π[r] = 1``), never negative, lower variance.

    Summed over a completion, k1 is an unbiased estimate of the sequence-level KL.
    """
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def last_token(mask: Tensor) -> Tensor:
    """``[S]`` the column of each completion's last token."""
    return (mask.sum(dim=1) - 1).clamp(min=0).long()


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``r_t = −β·KL_t`` on every token, plus the sequence's score on its last token (Ziegler et al.
    2019, arXiv 1909.08593, eq. 2; Stiennon et al. 2020): the reward model judges the whole
    completion, the penalty keeps each token near the reference."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(scores.shape[0], device=scores.device)
    return rewards.index_put((rows, last_token(mask)), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438), per token:

        δ_t = r_t + γ·V_{t+1} − V_t        (V after the last token is 0: the episode ends)
        A_t = δ_t + γλ·A_{t+1}              = Σ_l (γλ)^l δ_{t+l}
        R_t = A_t + V_t                      the value target (the λ-return)

    Returns ``(advantages, returns)``, zero past each completion's end.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """The unbiased variance over the masked entries (Bessel's correction, as TRL)."""
    count = mask.sum()
    centered = (values - masked_mean(values, mask)) * mask
    return (centered**2).sum() / (count - 1).clamp(min=1)


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the masked entries of the whole rollout batch
    (``shift_mean=False`` keeps the mean: only the scale changes). Advantage whitening is one of
    the details Huang et al. 2024 and "Secrets of RLHF" (Zheng et al. 2023, arXiv 2307.04964) found
    to matter for stable PPO."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


@dataclass
class Clipped:
    """A clipped objective per token, and where the clipped branch was the one taken."""

    loss: Tensor
    clipped: Tensor


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, cliprange: float) -> Clipped:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss per token:

        ρ_t = π_θ(y_t) / π_old(y_t)
        L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))

    Past the clip range in the direction the advantage favours, the loss is flat in θ (no gradient);
    in the other direction the unclipped term keeps its gradient.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return Clipped(torch.maximum(unclipped, clipped), (clipped > unclipped).float())


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, cliprange_value: float) -> Clipped:
    """The clipped value loss of PPO2 (OpenAI baselines; Huang et al. 2024, detail on value clipping):

    V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
    L_t    = ½ · max((V − R_t)², (V_clip − R_t)²)
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return Clipped(0.5 * torch.maximum(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).float())


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 − Var(R − V) / Var(R)`` over the masked tokens: 1 is a perfect critic, 0 one no better than
    a constant, negative a critic worse than one."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return 1.0 - (masked_var(returns - values, mask) / var_returns).item()


@dataclass
class KLController:
    """The KL coefficient β: fixed, or adaptive (Ziegler et al. 2019, arXiv 1909.08593, §2.2):

        e   = clip(KL / target − 1, −0.2, 0.2)
        β  ← β · (1 + e · n / horizon)

    after each rollout batch of ``n`` completions whose mean sequence KL was ``KL``. Its state is
    one number, saved in every checkpoint.
    """

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
