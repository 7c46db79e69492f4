"""PPO's pure pieces (``preftune.losses.ppo``) against hand-computed values: GAE, the per-token KL
penalty and both estimators, the clipped policy and value losses at and beyond the clip range,
advantage whitening, explained variance and the adaptive KL coefficient."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses.ppo import (
    KLController,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])

# --------------------------------------------------------------------------- GAE


def test_gae_matches_the_recursion_worked_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.1, 9.0]])  # 9.0 is padding: never read
    advantages, returns = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    # row 0: δ2 = 2 − 0.2 = 1.8; δ1 = 0.9·0.2 − 1 = −0.82, A1 = −0.82 + 0.72·1.8 = 0.476;
    #        δ0 = 1 + 0.9·1 − 0.5 = 1.4, A0 = 1.4 + 0.72·0.476 = 1.74272
    # row 1: δ1 = −0.1 (no value after the last token); δ0 = 0.5 + 0.09 − 0.3 = 0.29, A0 = 0.29 − 0.072
    expected = torch.tensor([[1.74272, 0.476, 1.8], [0.218, -0.1, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.1, 0.0]]))


def test_gae_with_gamma_and_lambda_one_gives_the_reward_to_go_whatever_the_values():
    rewards = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, 0.0]])
    _, returns = gae(rewards, torch.randn(2, 3), MASK, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[2.0, 1.0, 3.0], [4.5, 4.0, 0.0]]))


# --------------------------------------------------------------------------- KL penalty


def test_k1_and_k3_per_token_values_worked_by_hand():
    logps, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.25, 0.5]))
    log2 = math.log(2)
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), torch.tensor([log2, -log2]))
    # k3 = (r − 1) − log r with r = π_ref/π: r = 1/2 and r = 2
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), torch.tensor([-0.5 + log2, 1.0 - log2]))


def test_both_estimators_average_to_the_exact_kl_over_the_policys_distribution_and_k3_is_never_negative():
    policy = torch.softmax(torch.tensor([2.0, 0.5, -1.0, 0.0]), 0)
    reference = torch.softmax(torch.tensor([0.0, 1.0, 0.5, -0.5]), 0)
    exact = (policy * (policy.log() - reference.log())).sum()
    for estimator in ("k1", "k3"):
        per_token = kl_penalty(policy.log(), reference.log(), estimator)
        torch.testing.assert_close((policy * per_token).sum(), exact)
    assert (kl_penalty(policy.log(), reference.log(), "k3") >= 0).all()


def test_the_reward_is_the_kl_penalty_on_every_token_and_the_score_on_the_last_real_one():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 7.0]])  # 7.0 is padding
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, MASK, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, -1.9, 0.0]]))


# --------------------------------------------------------------------------- clipped objectives


def ratio_case(ratio: float, advantage: float, cliprange: float = 0.2):
    logps = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    out = policy_loss(
        logps, torch.zeros(1, dtype=torch.float64), torch.tensor([advantage], dtype=torch.float64), cliprange
    )
    out.loss.sum().backward()
    return out.loss.item(), logps.grad.item(), out.clipped.item()


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "grad", "clipped"),
    [
        (1.1, 2.0, -2.2, -2.2, 0.0),  # inside the range: the plain surrogate −A·ρ, gradient −A·ρ
        (1.2, 2.0, -2.4, None, 0.0),  # at the edge: both branches equal, not counted as clipped
        (1.5, 2.0, -2.4, 0.0, 1.0),  # beyond, the way A pushes: flat at −A·(1 + ε), no gradient
        (0.5, 2.0, -1.0, -1.0, 0.0),  # below, against A: the unclipped term keeps its gradient
        (0.5, -1.0, 0.8, 0.0, 1.0),  # A < 0, beyond 1 − ε: flat at −A·(1 − ε)
        (1.5, -1.0, 1.5, 1.5, 0.0),  # A < 0, above 1 + ε: unclipped, the loss keeps growing
    ],
)
def test_the_clipped_policy_loss_at_inside_and_beyond_the_clip_range(ratio, advantage, loss, grad, clipped):
    got_loss, got_grad, got_clipped = ratio_case(ratio, advantage)
    assert got_loss == pytest.approx(loss) and got_clipped == clipped
    if grad is not None:
        assert got_grad == pytest.approx(grad)


@pytest.mark.parametrize(
    ("value", "loss", "grad", "clipped"),
    [
        (0.1, 0.405, -0.9, 0.0),  # inside ±0.2 of the old value 0: ½(V − R)²
        (0.2, 0.32, None, 0.0),  # at the edge: both terms equal
        (0.5, 0.32, 0.0, 1.0),  # beyond, towards the return: ½(V_clip − R)² with V_clip = 0.2, no gradient
        (-0.5, 1.125, -1.5, 0.0),  # beyond, away from the return: the larger unclipped term
    ],
)
def test_the_clipped_value_loss_at_inside_and_beyond_the_clip_range(value, loss, grad, clipped):
    v = torch.tensor([value], dtype=torch.float64, requires_grad=True)
    out = value_loss(v, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 0.2)
    out.loss.sum().backward()
    assert out.loss.item() == pytest.approx(loss) and out.clipped.item() == clipped
    if grad is not None:
        assert v.grad.item() == pytest.approx(grad)


# --------------------------------------------------------------------------- whitening, critic metrics, β


def test_whitened_advantages_have_mean_zero_and_variance_one_over_real_tokens_only():
    values = torch.tensor([[1.0, 2.0, 6.0], [3.0, -4.0, 100.0]])
    white = whiten(values, MASK)
    assert masked_mean(white, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(white, MASK).item() == pytest.approx(1.0, abs=1e-6)
    assert white[1, 2] == 0.0
    padded_otherwise = values.clone()
    padded_otherwise[1, 2] = -7.0
    torch.testing.assert_close(whiten(padded_otherwise, MASK), white)
    kept = whiten(values, MASK, shift_mean=False)  # only the scale changes
    assert masked_mean(kept, MASK).item() == pytest.approx(masked_mean(values, MASK).item(), abs=1e-6)
    assert masked_var(kept, MASK).item() == pytest.approx(1.0, abs=1e-6)


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_a_constant_one():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    assert explained_variance(returns, returns, MASK) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, MASK) == pytest.approx(0.0, abs=1e-6)


def test_the_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_a_fifth_per_horizon():
    fixed = KLController(0.1)
    fixed.update(kl=50.0, n=64)
    assert fixed.value == 0.1
    adaptive = KLController(0.1, target=2.0, horizon=100)
    adaptive.update(kl=3.0, n=10)  # 50% over target, clipped to 20%: β · (1 + 0.2 · 10/100)
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(kl=1.5, n=10)  # 25% under, clipped to −20%
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)
