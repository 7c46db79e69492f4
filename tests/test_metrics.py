"""preftune.evaluation.metrics on hand-built pairs: implicit-reward accuracy, likelihood drift, ranking."""

import pytest
import torch

from preftune.evaluation.metrics import (
    bucket_label,
    drift,
    edit_bucket,
    edit_distance,
    implicit_variants,
    norm_accuracy,
    preference_metrics,
    ranking,
    sampled_kl,
)
from preftune.losses import PairStats


def stats(pi_w, pi_l, n_w, n_l, rho_w=None, rho_l=None):
    t = lambda xs: None if xs is None else torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return PairStats(t(pi_w), t(pi_l), t(n_w), t(n_l), t(rho_w), t(rho_l))


# Three pairs, worked by hand:
#   pair 1: π = (−10, −20), ρ = (−12, −15), |y| = (5, 5): drift (+2, −5), implicit 2 > −5 yes,
#           avg (−2, −4) policy ranks chosen first; ρ avg (−2.4, −3) reference too.
#   pair 2: π = (−30, −12), ρ = (−25, −10), |y| = (10, 3): drift (−5, −2), implicit −5 > −2 no,
#           chosen fell; avg (−3, −4) policy yes; ρ avg (−2.5, −3.33) yes.
#   pair 3: π = (−8, −6), ρ = (−7, −9), |y| = (2, 3): drift (−1, +3), implicit no, chosen fell;
#           avg (−4, −2) policy no; ρ avg (−3.5, −3) reference no.
PAIRS = stats([-10, -30, -8], [-20, -12, -6], [5, 10, 2], [5, 3, 3], [-12, -25, -7], [-15, -10, -9])


def test_drift_is_policy_minus_reference_log_likelihood_per_side():
    values = drift(PAIRS)
    assert values["drift/chosen"].tolist() == [2, -5, -1]
    assert values["drift/rejected"].tolist() == [-5, -2, 3]


def test_chosen_fell_marks_pairs_whose_chosen_likelihood_dropped_below_the_reference():
    assert drift(PAIRS)["drift/chosen_fell"].tolist() == [0, 1, 1]


def test_implicit_reward_accuracy_compares_log_ratios():
    assert drift(PAIRS)["implicit/accuracy"].tolist() == [1, 0, 0]


def test_ranking_uses_average_log_prob_under_policy_and_reference():
    values = ranking(PAIRS)
    assert values["ranking/policy"].tolist() == [1, 1, 0]
    assert values["ranking/reference"].tolist() == [1, 1, 0]


def test_reference_free_statistics_give_policy_ranking_only():
    values = preference_metrics(
        stats([-10.0], [-20.0], [5.0], [5.0]),
        type("Out", (), {"chosen_rewards": torch.tensor([1.0]), "rejected_rewards": torch.tensor([0.0])})(),
    )
    assert "drift/chosen" not in values and "ranking/reference" not in values
    assert values["ranking/policy"].item() == 1.0 and values["rewards/accuracies"].item() == 1.0


def test_means_over_pairs_are_the_reported_figures():
    values = {name: v.mean().item() for name, v in {**drift(PAIRS), **ranking(PAIRS)}.items()}
    assert values["drift/chosen"] == pytest.approx(-4 / 3)
    assert values["drift/chosen_fell"] == pytest.approx(2 / 3)
    assert values["ranking/policy"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- RewardBench variants
#   pair 1: per-token ratio (+2/5, −5/5) → chosen first; sum π −10 > −20 yes; avg yes.
#   pair 2: (−5/10, −2/3 = −0.667) → −0.5 > −0.667 chosen first (the summed ratio said no);
#           sum −30 > −12 no; avg −3 > −4 yes.
#   pair 3: (−1/2, +3/3) → no; sum −8 > −6 no; avg −4 > −2 no.


def test_rewardbench_variants_per_token_ratio_and_reference_free_sum_and_mean():
    values = implicit_variants(PAIRS)
    assert values["implicit/accuracy_length_normalized"].tolist() == [1, 1, 0]
    assert values["implicit/accuracy_ref_free_sum"].tolist() == [1, 0, 0]
    assert values["implicit/accuracy_ref_free_avg"].tolist() == ranking(PAIRS)["ranking/policy"].tolist()


def test_reference_free_variants_need_no_reference():
    values = implicit_variants(stats([-1.0], [-2.0], [1.0], [4.0]))
    assert set(values) == {"implicit/accuracy_ref_free_sum", "implicit/accuracy_ref_free_avg"}
    assert values["implicit/accuracy_ref_free_avg"].item() == 0  # −1 < −0.5


def test_rewardbench_norm_accuracy_prefers_the_smaller_norm():
    # −‖log p(y_t)‖₂ is the score: chosen with norm 2 beats rejected with norm 5.
    assert norm_accuracy(torch.tensor([2.0, 5.0]), torch.tensor([5.0, 2.0])).tolist() == [1, 0]


# --------------------------------------------------------------------------- edit distance


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ([], [], 0),
        ([1, 2, 3], [1, 2, 3], 0),
        ([5, 6, 7], [5, 9, 7], 1),  # one substitution
        ([1, 2], [2], 1),  # one deletion
        ([1, 2, 3], [1, 4, 2, 3], 1),  # one insertion
        ([1, 2, 3, 4], [4, 3, 2, 1], 4),
        ([7, 7, 7], [], 3),
        ([1, 2, 3, 4, 5, 6], [1, 9, 3, 9, 5, 9], 3),  # substitutions at 2, 4, 6
        ([10, 11, 12, 13], [11, 12, 13, 14], 2),  # kitten/sitting-like: delete front, add back
    ],
)
def test_edit_distance_on_known_token_sequences(a, b, distance):
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_edit_distance_matches_the_textbook_table_on_random_sequences():
    import random

    def textbook(a, b):
        d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
        return d[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(10))]
        b = [rng.randrange(4) for _ in range(rng.randrange(10))]
        assert edit_distance(a, b) == textbook(a, b)


def test_edit_buckets_double():
    assert [bucket_label(edit_bucket(d)) for d in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 100)] == [
        "0", "1", "2", "3–4", "3–4", "5–8", "5–8", "9–16", "9–16", "17–32", "65–128",
    ]  # fmt: skip


# --------------------------------------------------------------------------- KL estimate


def test_kl_estimate_is_the_mean_log_ratio_with_its_standard_error():
    mean, stderr = sampled_kl(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 0.0, 1.0, 2.0]))
    # ratios 1, 2, 2, 4: mean 2.25, sample std sqrt(1.5833), stderr std / 2
    assert mean == pytest.approx(2.25)
    assert stderr == pytest.approx((4.75 / 3) ** 0.5 / 2)
