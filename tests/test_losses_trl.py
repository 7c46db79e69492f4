"""Conformance of preftune's DPO family with TRL 1.16's own ``DPOTrainer._compute_loss``.

TRL's method is called unbound with a minimal fake ``self`` (:mod:`trl_fakes`); a fake model
returns per-token log-probs laid out so that TRL's own sums over its completion mask give exactly
the summed log-probs and token counts of the :class:`PairStats` handed to preftune. The
reference-free objectives are compared in ``test_losses_trl_cpo.py``, LD-DPO and WPO (which need
per-token values) in ``test_losses_trl_tokens.py``.

The DPO family is compared one pair per TRL call, so that TRL's returned loss is the per-pair
loss and its logged ``rewards/chosen`` / ``rewards/rejected`` are the per-pair rewards. The AOT
losses sort across the batch, so for them the batch mean is compared on several pairs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from trl_fakes import FakeModel, trl_compute_loss

from preftune.config import ObjectiveConfig
from preftune.evaluation.metrics import reward_metrics
from preftune.losses import PairStats, build_objective

DTYPE = torch.float64
ATOL = 1e-6
PAIRS = 8  # random pairs per configuration


# --------------------------------------------------------------------------- data


def random_stats(n: int, seed: int, *, spread: float = 8.0, max_tokens: int = 12) -> PairStats:
    """``n`` random pairs: summed log-probs in [-60, -2], reference = policy + N(0, spread²),
    integer token counts in [1, max_tokens]."""
    g = torch.Generator().manual_seed(seed)
    chosen = -(2 + 58 * torch.rand(n, generator=g, dtype=DTYPE))
    rejected = -(2 + 58 * torch.rand(n, generator=g, dtype=DTYPE))
    ref_chosen = chosen + spread * torch.randn(n, generator=g, dtype=DTYPE)
    ref_rejected = rejected + spread * torch.randn(n, generator=g, dtype=DTYPE)
    return PairStats(
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_tokens=torch.randint(1, max_tokens + 1, (n,), generator=g),
        rejected_tokens=torch.randint(1, max_tokens + 1, (n,), generator=g),
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
    )


def as_float32(stats: PairStats) -> PairStats:
    """The same statistics in float32 (token counts unchanged)."""
    return PairStats(
        *(t.float() if t is not None and t.is_floating_point() else t for t in dataclasses.astuple(stats))
    )


def pair(stats: PairStats, i: int) -> PairStats:
    """The i-th pair as a batch of one."""
    pick = slice(i, i + 1)
    assert stats.ref_chosen_logps is not None and stats.ref_rejected_logps is not None
    return PairStats(
        stats.chosen_logps[pick],
        stats.rejected_logps[pick],
        stats.chosen_tokens[pick],
        stats.rejected_tokens[pick],
        stats.ref_chosen_logps[pick],
        stats.ref_rejected_logps[pick],
    )


# --------------------------------------------------------------------------- TRL's DPOTrainer


def _trl_dpo_inputs(stats: PairStats) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """TRL's batch layout for ``stats``: rows ``[chosen..., rejected...]``, one prompt token, then
    exactly ``tokens`` completion tokens, then padding. On the shifted grid, each sequence's first
    completion position carries its whole summed log-prob and every other position 0, so TRL's
    sums are exact in any dtype (float32 included)."""
    logps = torch.cat([stats.chosen_logps, stats.rejected_logps])
    tokens = torch.cat([stats.chosen_tokens, stats.rejected_tokens]).long()
    rows, seq_len = len(logps), int(tokens.max()) + 2
    positions = torch.arange(seq_len)
    completion_mask = ((positions >= 1) & (positions <= tokens[:, None])).long()
    attention_mask = (positions <= tokens[:, None]).long()
    input_ids = torch.randint(3, 100, (rows, seq_len)) * attention_mask
    per_token_logps = torch.zeros(rows, seq_len - 1, dtype=logps.dtype)
    per_token_logps[:, 0] = logps
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": stats.ref_chosen_logps,
        "ref_rejected_logps": stats.ref_rejected_logps,
    }
    return inputs, per_token_logps


def trl_dpo(
    stats: PairStats,
    loss_types: list[str],
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_divergence_alpha: float = 0.5,
) -> tuple[float, dict[str, float]]:
    """TRL 1.16's ``DPOTrainer._compute_loss`` on ``stats``: (batch-mean loss, logged metrics)."""
    inputs, per_token_logps = _trl_dpo_inputs(stats)
    return trl_compute_loss(
        inputs,
        FakeModel(per_token_logps),
        loss_types,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_weights=loss_weights,
        discopop_tau=discopop_tau,
        f_divergence=f_divergence,
        f_divergence_alpha=f_divergence_alpha,
    )


def test_fake_trl_batch_reproduces_the_pair_statistics():
    """Guard for the harness itself: TRL's view of the fake batch has our sums and counts."""
    stats = random_stats(3, seed=0)
    inputs, per_token_logps = _trl_dpo_inputs(stats)
    shift_mask = inputs["completion_mask"][:, 1:]
    assert torch.equal(per_token_logps * (1 - shift_mask), torch.zeros_like(per_token_logps))
    torch.testing.assert_close(
        per_token_logps.sum(1), torch.cat([stats.chosen_logps, stats.rejected_logps]), rtol=0, atol=1e-12
    )
    counts = torch.cat([stats.chosen_tokens, stats.rejected_tokens])
    assert torch.equal(inputs["completion_mask"].sum(1), counts)
    assert torch.equal(shift_mask.sum(1), counts)


# Each case: objective name and the ObjectiveConfig values (beta, label_smoothing, discopop_tau).
PER_PAIR_CASES = [
    ("sigmoid", {"beta": 0.1}),
    ("sigmoid", {"beta": 0.5}),
    ("hinge", {"beta": 0.1}),
    ("hinge", {"beta": 0.5}),
    ("ipo", {"beta": 0.1}),
    ("ipo", {"beta": 0.5}),
    ("exo_pair", {"beta": 0.1, "label_smoothing": 0.1}),
    ("exo_pair", {"beta": 0.5, "label_smoothing": 0.001}),
    ("nca_pair", {"beta": 0.1}),
    ("nca_pair", {"beta": 0.5}),
    ("robust", {"beta": 0.1}),
    ("robust", {"beta": 0.5, "label_smoothing": 0.2}),
    ("bco_pair", {"beta": 0.1}),
    ("bco_pair", {"beta": 0.5}),
    ("sppo_hard", {"beta": 0.1}),
    ("sppo_hard", {"beta": 0.5}),
    ("apo_zero", {"beta": 0.1}),
    ("apo_zero", {"beta": 0.5}),
    ("apo_down", {"beta": 0.1}),
    ("apo_down", {"beta": 0.5}),
    ("discopop", {"beta": 0.1}),
    ("discopop", {"beta": 0.3, "discopop_tau": 0.2}),
    ("sft", {"beta": 0.1}),
    ("sigmoid_norm", {"beta": 0.1}),
    ("sigmoid_norm", {"beta": 2.0}),
]


def _case_id(case: tuple[str, dict[str, float]]) -> str:
    name, kw = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("name, kw", PER_PAIR_CASES, ids=[_case_id(c) for c in PER_PAIR_CASES])
def test_per_pair_loss_and_rewards_match_trl_dpo_trainer(name, kw):
    objective = build_objective(ObjectiveConfig(loss=[name], **kw))
    stats = random_stats(PAIRS, seed=len(name) * 7 + int(kw["beta"] * 10))
    out = objective(stats)
    for i in range(PAIRS):
        trl_loss, metrics = trl_dpo(
            pair(stats, i),
            [name],
            beta=kw["beta"],
            label_smoothing=kw.get("label_smoothing", 0.0),
            discopop_tau=kw.get("discopop_tau", 0.05),
        )
        assert out.losses[i].item() == pytest.approx(trl_loss, rel=0, abs=ATOL), f"pair {i}"
        assert out.chosen_rewards[i].item() == pytest.approx(metrics["rewards/chosen"], rel=0, abs=ATOL)
        assert out.rejected_rewards[i].item() == pytest.approx(metrics["rewards/rejected"], rel=0, abs=ATOL)


F_DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("js_divergence", {}),
    ("alpha_divergence", {}),
    ("alpha_divergence", {"f_divergence_alpha": 0.2}),
    ("alpha_divergence", {"f_divergence_alpha": 1.7}),
    ("alpha_divergence", {"f_divergence_alpha": 1.0}),
]
F_DIVERGENCE_OBJECTIVES = [
    ("sigmoid", {"beta": 0.1}),
    ("sigmoid_norm", {"beta": 0.5}),
    ("hinge", {"beta": 0.3}),
    ("ipo", {"beta": 0.5}),
    ("exo_pair", {"beta": 0.1, "label_smoothing": 0.01}),
    ("robust", {"beta": 0.1, "label_smoothing": 0.1}),
    ("discopop", {"beta": 0.1, "discopop_tau": 0.3}),
]


@pytest.mark.parametrize(
    "divergence, extra", F_DIVERGENCE_CASES, ids=[_case_id(c) for c in F_DIVERGENCE_CASES]
)
@pytest.mark.parametrize("name, kw", F_DIVERGENCE_OBJECTIVES, ids=[c[0] for c in F_DIVERGENCE_OBJECTIVES])
def test_f_divergence_per_pair_loss_and_rewards_match_trl_dpo_trainer(name, kw, divergence, extra):
    """Log-ratios within a few nats (spread 2): forward KL's e^−u stays moderate. TRL's α-divergence
    takes float32 or 16-bit log-probs only (as training produces), so those pairs are float32."""
    config = ObjectiveConfig(loss=[name], f_divergence=divergence, **kw, **extra)  # type: ignore[arg-type]
    stats = random_stats(PAIRS, seed=31, spread=2.0)
    if divergence == "alpha_divergence":
        stats = as_float32(stats)
    out = build_objective(config)(stats)
    for i in range(PAIRS):
        trl_loss, metrics = trl_dpo(pair(stats, i), [name], f_divergence=divergence, **kw, **extra)
        assert out.losses[i].item() == pytest.approx(trl_loss, rel=0, abs=ATOL), f"pair {i}"
        assert out.chosen_rewards[i].item() == pytest.approx(metrics["rewards/chosen"], rel=0, abs=ATOL)
        assert out.rejected_rewards[i].item() == pytest.approx(metrics["rewards/rejected"], rel=0, abs=ATOL)


def test_f_divergence_changes_the_loss_on_these_pairs():
    """Guard: each divergence gives other losses than DPO's on the pairs compared above."""
    stats = random_stats(PAIRS, seed=31, spread=2.0)
    dpo = build_objective(ObjectiveConfig(loss=["sigmoid"]))(stats).losses
    for divergence, extra in F_DIVERGENCE_CASES[:-1]:
        config = ObjectiveConfig(loss=["sigmoid"], f_divergence=divergence, **extra)  # type: ignore[arg-type]
        assert (build_objective(config)(stats).losses - dpo).abs().max() > 1e-2, (divergence, extra)


def test_f_divergence_with_an_nll_term_matches_trl_loss_weights():
    """TRL accepts ``sft`` beside an f-divergence (the NLL term reads no log-ratio)."""
    config = ObjectiveConfig(loss=["sigmoid", "sft"], weights=[1.0, 0.5], f_divergence="js_divergence")
    stats = random_stats(PAIRS, seed=32, spread=2.0)
    out = build_objective(config)(stats)
    for i in range(PAIRS):
        trl_loss, _ = trl_dpo(
            pair(stats, i),
            ["sigmoid", "sft"],
            beta=0.1,
            loss_weights=[1.0, 0.5],
            f_divergence="js_divergence",
        )
        assert out.losses[i].item() == pytest.approx(trl_loss, rel=0, abs=ATOL)


def test_random_pairs_cover_both_sides_of_the_hinge_and_of_zero_margin():
    """Guard for the data: the comparisons above see both signs of h and both hinge branches."""
    logits = 0.5 * random_stats(PAIRS, seed=len("hinge") * 7 + 5).margin
    assert (logits > 1).any() and (logits < 1).any()
    assert (logits > 0).any() and (logits < 0).any()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_batch_mean_loss_of_aot_matches_trl_dpo_trainer(name, label_smoothing):
    stats = random_stats(PAIRS, seed=11)
    out = build_objective(ObjectiveConfig(loss=[name], beta=0.2, label_smoothing=label_smoothing))(stats)
    trl_loss, metrics = trl_dpo(stats, [name], beta=0.2, label_smoothing=label_smoothing)
    assert out.losses.mean().item() == pytest.approx(trl_loss, rel=0, abs=ATOL)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=0, abs=ATOL)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=0, abs=ATOL)


def test_aot_sorting_makes_the_batch_loss_differ_from_the_unsorted_dpo_loss():
    """Guard: on this batch sorting matters, so the AOT comparison is not just DPO's."""
    stats = random_stats(PAIRS, seed=11)
    aot_loss, _ = trl_dpo(stats, ["aot"], beta=0.2)
    dpo_loss, _ = trl_dpo(stats, ["sigmoid"], beta=0.2)
    assert abs(aot_loss - dpo_loss) > 1e-3


def test_weighted_mixture_of_sigmoid_and_sft_matches_trl_loss_weights():
    objective = build_objective(ObjectiveConfig(loss=["sigmoid", "sft"], weights=[1.0, 0.5], beta=0.1))
    stats = random_stats(PAIRS, seed=3)
    out = objective(stats)
    for i in range(PAIRS):
        trl_loss, metrics = trl_dpo(pair(stats, i), ["sigmoid", "sft"], beta=0.1, loss_weights=[1.0, 0.5])
        assert out.losses[i].item() == pytest.approx(trl_loss, rel=0, abs=ATOL)
        assert out.chosen_rewards[i].item() == pytest.approx(metrics["rewards/chosen"], rel=0, abs=ATOL)
        assert out.rejected_rewards[i].item() == pytest.approx(metrics["rewards/rejected"], rel=0, abs=ATOL)


def test_reward_metrics_averaged_over_the_batch_equal_trl_logged_metrics():
    stats = random_stats(PAIRS, seed=5)
    out = build_objective(ObjectiveConfig(loss=["sigmoid"], beta=0.3))(stats)
    ours = {k: v.mean().item() for k, v in reward_metrics(stats, out).items()}
    _, trl_metrics = trl_dpo(stats, ["sigmoid"], beta=0.3)
    assert set(ours) <= set(trl_metrics)
    for key, value in ours.items():
        assert value == pytest.approx(trl_metrics[key], rel=0, abs=ATOL), key
