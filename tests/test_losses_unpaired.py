"""The unpaired objectives (KTO, APO-zero unpaired) and KTO's KL estimate.

Golden values are worked out by hand in each docstring and recomputed with ``helpers.sigma``. Unless a
test says otherwise the batch is two examples, β = 0.1:

    desirable:    π = −10, ρ = −12, so r = π − ρ = 2,  reward βr = 0.2
    undesirable:  π = −15, ρ = −14, so r = −1,         reward βr = −0.1

The last tests drive TRL 1.16's own ``KTOTrainer._compute_loss`` on random statistics and compare
its batch loss, KL estimate and logged rewards with preftune's, to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from helpers import sigma
from trl_fakes import trl_kto_compute_loss

from preftune.config import ObjectiveConfig
from preftune.losses import (
    UNPAIRED,
    UnpairedOutput,
    UnpairedStats,
    build_unpaired_objective,
    kto_reference_point,
)

TOL = 1e-6
DTYPE = torch.float64


def batch(kl: float = 0.0) -> UnpairedStats:
    return UnpairedStats(
        logps=torch.tensor([-10.0, -15.0], dtype=DTYPE),
        ref_logps=torch.tensor([-12.0, -14.0], dtype=DTYPE),
        desirable=torch.tensor([True, False]),
        kl=torch.tensor(kl, dtype=DTYPE),
    )


def run(name: str, stats: UnpairedStats, **params: float) -> UnpairedOutput:
    return build_unpaired_objective(ObjectiveConfig(loss=[name], **params))(stats)


def check(out: UnpairedOutput, losses: list[float], rewards: tuple[float, float] = (0.2, -0.1)) -> None:
    assert out.losses.tolist() == pytest.approx(losses, rel=0, abs=TOL)
    assert out.rewards.tolist() == pytest.approx(list(rewards), rel=0, abs=TOL)


# --------------------------------------------------------------------------- golden values


def test_kto_golden():
    """KTO with z = 0.4: desirable 1 − σ(β(r − z)) = 1 − σ(0.16) = σ(−0.16) ≈ 0.460085;
    undesirable 1 − σ(β(z − r)) = 1 − σ(0.14) = σ(−0.14) ≈ 0.465057.
    With z = 0 (a clamped estimate): σ(−0.2) ≈ 0.450166 and 1 − σ(0.1) = σ(−0.1) ≈ 0.475021."""
    check(run("kto", batch(kl=0.4)), [sigma(-0.16), sigma(-0.14)])
    assert sigma(-0.16) == pytest.approx(0.460085, abs=1e-6)
    check(run("kto", batch(kl=0.0)), [sigma(-0.2), sigma(-0.1)])


def test_kto_weights_scale_each_kind_of_example_golden():
    """λ_D = 2, λ_U = 0.5, z = 0.4: 2·σ(−0.16) ≈ 0.920170 and 0.5·σ(−0.14) ≈ 0.232529; the rewards
    stay βr (unweighted), as TRL logs them."""
    out = run("kto", batch(kl=0.4), desirable_weight=2.0, undesirable_weight=0.5)
    check(out, [2 * sigma(-0.16), 0.5 * sigma(-0.14)])
    assert out.losses[0].item() == pytest.approx(0.920170, abs=1e-6)


def test_apo_zero_unpaired_golden():
    """APO-zero unpaired reads no KL: desirable 1 − σ(βr) = 1 − σ(0.2) ≈ 0.450166, undesirable
    σ(βr) = σ(−0.1) ≈ 0.475021, whatever z the batch carries; with λ_D = 2, λ_U = 0.5:
    ≈ 0.900332 and ≈ 0.237510."""
    check(run("apo_zero_unpaired", batch(kl=5.0)), [1 - sigma(0.2), sigma(-0.1)])
    out = run("apo_zero_unpaired", batch(), desirable_weight=2.0, undesirable_weight=0.5)
    check(out, [2 * (1 - sigma(0.2)), 0.5 * sigma(-0.1)])
    assert out.losses.tolist() == pytest.approx([0.900332, 0.237510], abs=1e-6)


def test_every_unpaired_objective_has_a_golden_test():
    missing = [name for name in UNPAIRED if f"test_{name}_golden" not in globals()]
    assert not missing, f"no golden-value test for {missing}"


def test_the_kl_estimate_is_detached_so_only_each_examples_own_log_ratio_gets_a_gradient():
    """d/dπ of 1 − σ(β(π − ρ − z)) is −β σ(x)(1 − σ(x)) at x = β(r − z) = 0.16."""
    stats = batch(kl=0.4)
    stats.logps.requires_grad_(True)
    run("kto", stats).losses[0].backward()
    assert stats.logps.grad is not None
    expected = -0.1 * sigma(0.16) * (1 - sigma(0.16))
    assert stats.logps.grad.tolist() == pytest.approx([expected, 0.0], abs=TOL)


# --------------------------------------------------------------------------- the KL estimate


def test_the_kl_estimate_is_the_batch_mean_of_the_mismatched_log_ratios():
    """Policy [−20, −21] against reference [−20.5, −21.3]: log-ratios 0.5 and 0.3, mean 0.4."""
    z = kto_reference_point(
        torch.tensor([-20.0, -21.0], dtype=DTYPE), torch.tensor([-20.5, -21.3], dtype=DTYPE)
    )
    assert z.item() == pytest.approx(0.4, abs=TOL)
    assert not z.requires_grad


def test_a_negative_kl_estimate_is_clamped_at_zero():
    """Log-ratios −1 and 0.2: mean −0.4, which no KL can be, so z = 0."""
    z = kto_reference_point(torch.tensor([-20.0, -21.0]), torch.tensor([-19.0, -21.2]))
    assert z.item() == 0.0


def test_the_estimate_is_averaged_over_processes_before_it_is_clamped():
    """This process 0.4, the other −1.2: their mean −0.4 clamps to 0 (clamping first would give 0.2)."""
    other = torch.tensor(-1.2, dtype=DTYPE)
    z = kto_reference_point(
        torch.tensor([-20.0, -21.0], dtype=DTYPE),
        torch.tensor([-20.5, -21.3], dtype=DTYPE),
        gather_mean=lambda local: (local + other) / 2,
    )
    assert z.item() == 0.0


# --------------------------------------------------------------------------- TRL's own code


def random_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -(2 + 40 * torch.rand(n, generator=g))
    kl_logps = -(2 + 40 * torch.rand(n, generator=g))
    return {
        "logps": logps,
        "ref_logps": logps + 3 * torch.randn(n, generator=g),
        # A positive mean most of the time, so that the clamp is not all that is compared.
        "kl_logps": kl_logps,
        "ref_kl_logps": kl_logps - 0.5 + torch.randn(n, generator=g),
        "desirable": torch.arange(n) % 3 != 0,
    }


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize(("desirable_weight", "undesirable_weight"), [(1.0, 1.0), (1.33, 0.7)])
@pytest.mark.parametrize(
    "other_process_kl", [None, -0.3, 2.0], ids=["one-process", "other-low", "other-high"]
)
def test_matches_trl_kto_compute_loss(loss_type, desirable_weight, undesirable_weight, other_process_kl):
    """TRL's batch loss (the mean of its weighted per-example losses), its KL metric and its logged
    rewards and log-probs per kind, on 6 random batches of 7 examples each; under a simulated second
    process whose micro-batch KL estimate is ``other_process_kl``."""
    objective = build_unpaired_objective(
        ObjectiveConfig(
            loss=[loss_type],
            beta=0.2,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )
    )
    other = None if other_process_kl is None else torch.tensor(other_process_kl)
    for seed in range(6):
        data = random_batch(7, seed)
        trl_loss, trl_metrics = trl_kto_compute_loss(
            data,
            loss_type,
            beta=0.2,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            other_process_kl=other,
        )
        gather = None if other is None else (lambda local: (local + other) / 2)
        z = (
            kto_reference_point(data["kl_logps"], data["ref_kl_logps"], gather)
            if objective.needs_kl
            else torch.zeros(())
        )
        out = objective(UnpairedStats(data["logps"], data["ref_logps"], data["desirable"], z))
        chosen, rejected = data["desirable"], ~data["desirable"]
        assert out.losses.mean().item() == pytest.approx(trl_loss, abs=TOL)
        assert z.item() == pytest.approx(trl_metrics["kl"], abs=TOL)
        assert out.rewards[chosen].mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=TOL)
        assert out.rewards[rejected].mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=TOL)
        assert data["logps"][chosen].mean().item() == pytest.approx(trl_metrics["logps/chosen"], abs=1e-5)
