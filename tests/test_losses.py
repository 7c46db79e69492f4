"""Specification of the objective registry beyond TRL conformance (see test_losses_trl.py).

Notation: ``π_w, π_l`` summed policy log-probs of the chosen / rejected completion, ``ρ_w, ρ_l``
the reference's, ``|y|`` token counts, ``h = (π_w − ρ_w) − (π_l − ρ_l)``, ``σ`` the logistic
function. Expected values come from the formulas written out here with :mod:`math`, never from
preftune itself.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPE, neg_logsigmoid, objective, sigma, stats_of

from preftune.evaluation.metrics import reward_metrics
from preftune.losses import PairStats

# --------------------------------------------------------------------------- DPOP


def test_dpop_equals_dpo_while_chosen_likelihood_is_above_the_reference():
    """π_w = −10, ρ_w = −12, π_l = −15, ρ_l = −14, β = 0.1, λ = 50.

    h = (−10 + 12) − (−15 + 14) = 2 + 1 = 3; penalty = max(0, ρ_w − π_w) = max(0, −2) = 0;
    loss = −log σ(β h) = −log σ(0.3) = log(1 + e^{−0.3}) ≈ 0.554355, the DPO loss.
    """
    stats = stats_of([-10.0], [-15.0], [-12.0], [-14.0])
    dpop = objective("dpop", beta=0.1, dpop_lambda=50.0)(stats).losses.item()
    assert dpop == pytest.approx(0.5543552444685271, abs=1e-12)
    assert dpop == pytest.approx(neg_logsigmoid(0.3), abs=1e-12)


@pytest.mark.parametrize(
    "lam, z, expected",
    [
        (50.0, -2.35, 2.4410914408948416),
        (5.0, -0.1, 0.744396660073571),
    ],
)
def test_dpop_penalizes_chosen_likelihood_below_the_reference_inside_beta(lam, z, expected):
    """π_w = −12.5, ρ_w = −12, π_l = −16, ρ_l = −14, β = 0.1 (Pal et al. 2024, Eq. 3).

    h = (−12.5 + 12) − (−16 + 14) = −0.5 + 2 = 1.5; penalty = max(0, −12 + 12.5) = 0.5;
    z = β (h − λ · 0.5):
      λ = 50: z = 0.1 (1.5 − 25)  = −2.35, loss = log(1 + e^{2.35}) ≈ 2.441091;
      λ = 5:  z = 0.1 (1.5 − 2.5) = −0.1,  loss = log(1 + e^{0.1})  ≈ 0.744397.
    (λ outside β, −log σ(βh − λ·0.5), would give z = −24.85 and −2.35 instead.)
    """
    stats = stats_of([-12.5], [-16.0], [-12.0], [-14.0])
    loss = objective("dpop", beta=0.1, dpop_lambda=lam)(stats).losses.item()
    assert loss == pytest.approx(expected, abs=1e-12)
    assert loss == pytest.approx(neg_logsigmoid(z), abs=1e-12)


def test_dpop_loss_exceeds_dpo_loss_when_the_penalty_is_active():
    """Same pair as above: DPO gives −log σ(0.15) ≈ 0.620957 < DPOP's ≈ 2.441091."""
    stats = stats_of([-12.5], [-16.0], [-12.0], [-14.0])
    dpo = objective("sigmoid", beta=0.1)(stats).losses.item()
    dpop = objective("dpop", beta=0.1)(stats).losses.item()
    assert dpo == pytest.approx(neg_logsigmoid(0.15), abs=1e-12)
    assert dpop > dpo + 1.0


def test_dpop_rewards_are_the_dpo_implicit_rewards():
    stats = stats_of([-12.5], [-16.0], [-12.0], [-14.0])
    out = objective("dpop", beta=0.1)(stats)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * -0.5, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(0.1 * -2.0, abs=1e-12)


# --------------------------------------------------------------------------- cDPO


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "dpo"])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothed_dpo_is_conservative_dpo(name, eps):
    """cDPO (Mitchell 2023): −(1 − ε) log σ(βh) + −ε log σ(−βh)."""
    pi_w, pi_l, rho_w, rho_l = (
        [-10.0, -30.0, -7.0],
        [-15.0, -20.0, -9.0],
        [-12.0, -25.0, -8.0],
        [-14.0, -22.0, -7.0],
    )
    beta = 0.2
    out = objective(name, beta=beta, label_smoothing=eps)(stats_of(pi_w, pi_l, rho_w, rho_l))
    for i in range(3):
        x = beta * ((pi_w[i] - rho_w[i]) - (pi_l[i] - rho_l[i]))
        expected = (1 - eps) * neg_logsigmoid(x) + eps * neg_logsigmoid(-x)
        assert out.losses[i].item() == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- gradients


def _grads(loss_name: str, stats: PairStats, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    objective(loss_name, **kw)(stats).losses.sum().backward()
    assert stats.chosen_logps.grad is not None and stats.rejected_logps.grad is not None
    return stats.chosen_logps.grad, stats.rejected_logps.grad


def test_dpo_gradient_is_beta_times_sigmoid_of_negative_logit():
    """dL/dπ_w = −β σ(−βh), dL/dπ_l = +β σ(−βh)."""
    pi_w, pi_l, rho_w, rho_l = [-10.0, -30.0], [-15.0, -20.0], [-12.0, -25.0], [-14.0, -22.0]
    beta = 0.3
    g_w, g_l = _grads("sigmoid", stats_of(pi_w, pi_l, rho_w, rho_l, requires_grad=True), beta=beta)
    for i in range(2):
        h = (pi_w[i] - rho_w[i]) - (pi_l[i] - rho_l[i])
        assert g_w[i].item() == pytest.approx(-beta * sigma(-beta * h), abs=1e-12)
        assert g_l[i].item() == pytest.approx(beta * sigma(-beta * h), abs=1e-12)


@pytest.mark.parametrize(
    "pi_w, rho_w, active",
    [(-10.0, -12.0, False), (-12.5, -12.0, True)],
    ids=["penalty-inactive", "penalty-active"],
)
def test_dpop_gradient_scales_the_chosen_term_by_one_plus_lambda_when_the_penalty_is_active(
    pi_w, rho_w, active
):
    """z = β(h − λ max(0, ρ_w − π_w));
    dL/dπ_w = −β (1 + λ·1[ρ_w > π_w]) σ(−z), dL/dπ_l = β σ(−z)."""
    pi_l, rho_l, beta, lam = -16.0, -14.0, 0.1, 5.0
    stats = stats_of([pi_w], [pi_l], [rho_w], [rho_l], requires_grad=True)
    g_w, g_l = _grads("dpop", stats, beta=beta, dpop_lambda=lam)
    h = (pi_w - rho_w) - (pi_l - rho_l)
    z = beta * (h - lam * max(0.0, rho_w - pi_w))
    assert (rho_w > pi_w) is active
    assert g_w.item() == pytest.approx(-beta * (1 + lam * active) * sigma(-z), abs=1e-12)
    assert g_l.item() == pytest.approx(beta * sigma(-z), abs=1e-12)


def test_simpo_gradient_is_length_normalized():
    """z = β π_w/|y_w| − β π_l/|y_l| − γ; dL/dπ_w = −(β/|y_w|) σ(−z), dL/dπ_l = (β/|y_l|) σ(−z)."""
    pi_w, pi_l, n_w, n_l = [-6.0, -20.0], [-9.0, -4.0], [4, 10], [3, 2]
    beta, gamma = 2.0, 0.7
    stats = stats_of(pi_w, pi_l, n_w=n_w, n_l=n_l, requires_grad=True)
    g_w, g_l = _grads("simpo", stats, beta=beta, simpo_gamma=gamma)
    for i in range(2):
        z = beta * pi_w[i] / n_w[i] - beta * pi_l[i] / n_l[i] - gamma
        assert g_w[i].item() == pytest.approx(-(beta / n_w[i]) * sigma(-z), abs=1e-12)
        assert g_l[i].item() == pytest.approx((beta / n_l[i]) * sigma(-z), abs=1e-12)


GRADCHECK_CASES = [
    ("sigmoid", {"beta": 0.3, "label_smoothing": 0.1}),
    ("ipo", {"beta": 0.5}),
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.1}),
    ("nca_pair", {"beta": 0.3}),
    ("robust", {"beta": 0.3, "label_smoothing": 0.2}),
    ("discopop", {"beta": 0.1}),
    ("dpop", {"beta": 0.1, "dpop_lambda": 5.0}),
    ("simpo", {"beta": 2.0}),
    ("cpo", {"beta": 0.1}),
    ("orpo", {"beta": 0.5}),
    ("alphapo", {"beta": 2.0, "alphapo_alpha": -0.5}),
    ("sigmoid", {"beta": 0.3, "f_divergence": "forward_kl"}),
    ("ipo", {"beta": 0.5, "f_divergence": "js_divergence"}),
    ("robust", {"beta": 0.3, "label_smoothing": 0.1, "f_divergence": "alpha_divergence"}),
]


@pytest.mark.parametrize("name, kw", GRADCHECK_CASES, ids=[f"{c[0]}-{c[1]}" for c in GRADCHECK_CASES])
def test_autograd_gradient_matches_finite_differences(name, kw):
    g = torch.Generator().manual_seed(0)
    n_w = torch.tensor([3, 5, 2, 7])
    n_l = torch.tensor([4, 1, 6, 2])
    # Per-token means in [-2, -0.1] (ORPO needs probabilities below 1).
    pi_w = -(0.1 + 1.9 * torch.rand(4, generator=g, dtype=DTYPE)) * n_w
    pi_l = -(0.1 + 1.9 * torch.rand(4, generator=g, dtype=DTYPE)) * n_l
    rho_w = pi_w + torch.tensor([1.0, -1.5, 0.7, -0.4], dtype=DTYPE)  # DPOP: both sides of its kink
    rho_l = pi_l + torch.randn(4, generator=g, dtype=DTYPE)
    obj = objective(name, **kw)

    def losses(*xs: torch.Tensor) -> torch.Tensor:
        return obj(PairStats(xs[0], xs[1], n_w, n_l, *xs[2:])).losses

    inputs = [pi_w, pi_l] + ([rho_w, rho_l] if obj.needs_reference else [])
    inputs = [x.clone().requires_grad_(True) for x in inputs]
    assert torch.autograd.gradcheck(losses, tuple(inputs), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- metrics


def test_reward_metrics_use_trl_names_and_values():
    """β = 0.1; pair 0: r_w = 0.1·(−10 + 11) = 0.1, r_l = 0.1·(−15 + 14) = −0.1;
    pair 1: r_w = 0.1·(−20 + 18) = −0.2, r_l = 0.1·(−19 + 21) = 0.2;
    pair 2 is a tie, r_w = r_l = 0.1, which counts as not accurate (strict >, as TRL)."""
    stats = stats_of([-10.0, -20.0, -5.0], [-15.0, -19.0, -8.0], [-11.0, -18.0, -6.0], [-14.0, -21.0, -9.0])
    metrics = reward_metrics(stats, objective("sigmoid", beta=0.1)(stats))
    expected = {
        "rewards/chosen": [0.1, -0.2, 0.1],
        "rewards/rejected": [-0.1, 0.2, 0.1],
        "rewards/accuracies": [1.0, 0.0, 0.0],
        "rewards/margins": [0.2, -0.4, 0.0],
        "logps/chosen": [-10.0, -20.0, -5.0],
        "logps/rejected": [-15.0, -19.0, -8.0],
    }
    assert set(metrics) == set(expected)
    for key, values in expected.items():
        assert metrics[key].tolist() == pytest.approx(values, abs=1e-12), key


def test_reward_metrics_are_detached():
    stats = stats_of([-10.0], [-15.0], [-11.0], [-14.0], requires_grad=True)
    metrics = reward_metrics(stats, objective("sigmoid")(stats))
    assert not any(v.requires_grad for v in metrics.values())
