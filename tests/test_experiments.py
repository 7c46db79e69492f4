"""``preftune experiment``: every experiment runs end to end in its quick form (seconds), writes
its numbers, report and plot, and gives the same numbers for the same seed. The full runs, which
check what each experiment shows, are marked slow (``pytest -m slow``)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from preftune.cli import main
from preftune.experiments import EXPERIMENTS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Each experiment's quick run through the command line, once for the module."""
    results = {}
    for name in EXPERIMENTS:
        output = tmp_path_factory.mktemp(name)
        assert main(["experiment", name, "--quick", "--seed", "3", "--output", str(output)]) == 0
        results[name] = output
    return results


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_run_writes_every_number_a_report_and_a_plot(quick, name):
    output = quick[name]
    results = json.loads((output / "results.json").read_text())
    assert results["experiment"] == name and results["seed"] == 3 and results["quick"] is True
    report = (output / "report.md").read_text()
    assert report.startswith(f"# {name} (seed 3, quick)") and "What it shows" in report
    assert (output / f"{name}.png").stat().st_size > 10_000
    assert not list(output.glob(".tmp-*"))


def test_dporm_vs_exrm_reports_every_set_against_its_ceiling(quick):
    results = json.loads((quick["dporm-vs-exrm"] / "results.json").read_text())
    assert list(results["sets"]) == ["train", "in_distribution", "prompt_shift", "response_shift"]
    for figures in results["sets"].values():
        assert 0.5 <= figures["bayes_accuracy"] <= 1
        assert {"beta=0.1", "beta=0.3"} <= set(figures) and 0 <= figures["ex_rm_accuracy"] <= 1


def test_likelihood_drift_reports_each_objective_at_each_k(quick):
    results = json.loads((quick["likelihood-drift"] / "results.json").read_text())
    assert set(results["objectives"]) == {"DPO", "DPOP λ=5", "DPOP λ=50"}
    for by_k in results["objectives"].values():
        assert list(by_k) == ["1", "2", "4", "8", "16"]
        for k, figures in by_k.items():
            assert figures["mean_edit_distance"] == int(k)  # rejected is chosen with k tokens substituted
            total = figures["chosen_drift_on_substituted_tokens"] + figures["chosen_drift_on_shared_tokens"]
            assert total == pytest.approx(figures["chosen_logp_drift"], abs=1e-3)


def test_ranking_consistency_measures_the_reference_and_four_policies(quick):
    results = json.loads((quick["ranking-consistency"] / "results.json").read_text())
    assert list(results["models"]) == [
        "reference", "DPO (gentle)", "SimPO (gentle)", "DPO (strong)", "SimPO (strong)",
    ]  # fmt: skip
    assert results["models"]["reference"]["kl_to_reference"] == 0.0
    assert all(results["trajectories"][label] for label in results["models"] if label != "reference")


def test_frontier_measures_every_method_and_gives_best_of_n_its_analytic_kl(quick):
    results = json.loads((quick["frontier"] / "results.json").read_text())
    methods = {p["method"] for p in results["points"]}
    assert methods == {"DPO", "PPO (true reward)", "PPO (reward model)", "online DPO", "best-of-N"}
    best_of = [p for p in results["points"] if p["method"] == "best-of-N"]
    for point, n in zip(best_of, (1, 2, 4, 8), strict=True):
        assert point["setting"] == f"N={n}" and point["kl"] == pytest.approx(
            math.log(n) - (n - 1) / n, rel=1e-5
        )
    assert [p["reward"] for p in best_of] == sorted(
        p["reward"] for p in best_of
    )  # more draws, no less reward


def test_expected_best_of_n_equals_the_mean_over_every_subset_of_the_pool():
    from preftune.experiments.frontier import expected_best

    pool = [0.3, -1.0, 0.5, 0.5, 0.0, 0.9]
    for n in (1, 2, 3, 6):
        subsets = list(itertools.combinations(pool, n))
        assert expected_best(pool, n) == pytest.approx(sum(max(s) for s in subsets) / len(subsets))


def test_the_same_seed_gives_the_same_numbers(quick, tmp_path):
    assert main(["experiment", "likelihood-drift", "--quick", "--seed", "3", "--output", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    first = json.loads((quick["likelihood-drift"] / "results.json").read_text())
    assert again["objectives"] == first["objectives"]


def test_list_names_every_experiment(capsys):
    code, out, _ = run_cli(capsys, "experiment", "--list")
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == list(EXPERIMENTS)


def test_an_unknown_experiment_is_one_clear_message(capsys, tmp_path):
    code, _, err = run_cli(capsys, "experiment", "dpo-vs-exrm", "--output", str(tmp_path / "out"))
    assert code == 2
    assert err.strip() == (
        "preftune: error: unknown experiment 'dpo-vs-exrm' (did you mean 'dporm-vs-exrm'?); there are: "
        f"{', '.join(EXPERIMENTS)} (preftune experiment --list)"
    )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the full runs


@pytest.mark.slow
def test_dporm_vs_exrm_full(tmp_path):
    """EX-RM reaches the Bayes ceiling; DPO-RM at β = 0.3 fits as well in distribution and loses
    accuracy under response shift (measured over seeds 0–4: see docs/experiments.md)."""
    _, run = EXPERIMENTS["dporm-vs-exrm"]
    sets = run(tmp_path, 0, False)["sets"]
    assert sets["in_distribution"]["ex_rm_accuracy"] > sets["in_distribution"]["bayes_accuracy"] - 0.02
    assert sets["in_distribution"]["beta=0.3"]["gap"] > -0.03
    assert sets["response_shift"]["beta=0.3"]["gap"] < sets["in_distribution"]["beta=0.3"]["gap"] - 0.01


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """``full(name)``: the experiment's folder and results at seed 0, run once for the module."""
    runs = {}

    def run(name):
        if name not in runs:
            output = tmp_path_factory.mktemp(name)
            runs[name] = output, EXPERIMENTS[name][1](output, 0, False)
        return runs[name]

    return run


@pytest.mark.slow
def test_likelihood_drift_full(full):
    """DPO lowers log p(chosen) when chosen and rejected differ in one token, raises it at sixteen;
    DPOP keeps it up."""
    by_objective = full("likelihood-drift")[1]["objectives"]
    dpo = by_objective["DPO"]
    assert dpo["1"]["chosen_logp_drift"] < -3 < 0 < dpo["16"]["chosen_logp_drift"]
    assert all(dpo[k]["dpo_rm_accuracy"] > 0.95 for k in dpo)
    assert (
        dpo["1"]["chosen_drift_on_shared_tokens"] < -3 and dpo["1"]["chosen_drift_on_substituted_tokens"] > 0
    )
    assert by_objective["DPOP λ=5"]["1"]["chosen_logp_drift"] > -0.5


@pytest.mark.slow
def test_check_data_suggests_dpop_on_exactly_the_pair_sets_whose_chosen_likelihood_dpo_lowered(full):
    """check-data's prediction from the data and the reference against what the experiment measured."""
    output, results = full("likelihood-drift")
    dpo = results["objectives"]["DPO"]
    for k in ("1", "2", "4", "8", "16"):
        report = output / f"check-k{k}.json"
        argv = ["check-data", str(output / "data" / f"train_k{k}.jsonl"), "--output", str(report)]
        assert main([*argv, "--model", str(output / "runs" / "sft" / "final")]) == 0
        fired = {f["name"]: f["fires"] for f in json.loads(report.read_text())["findings"]}
        assert fired["near-identical pairs"] == (dpo[k]["chosen_logp_drift"] < 0), k


@pytest.mark.slow
def test_ranking_consistency_full(full):
    """The reference ranks at chance; gentle DPO's mean log-prob trails its implicit reward; SimPO ranks higher."""
    models = full("ranking-consistency")[1]["models"]
    assert 0.4 < models["reference"]["ranking_consistency_train"] < 0.6
    dpo, simpo = models["DPO (gentle)"], models["SimPO (gentle)"]
    assert dpo["dpo_rm_accuracy_train"] - dpo["ranking_consistency_train"] > 0.05
    assert simpo["ranking_consistency_train"] > dpo["ranking_consistency_train"]


@pytest.mark.slow
def test_check_data_measures_the_reference_ranking_the_ranking_consistency_experiment_measures(full):
    output, results = full("ranking-consistency")
    reference = results["models"]["reference"]
    for name, key in (("train", "ranking_consistency_train"), ("heldout", "ranking_consistency_heldout")):
        report = output / f"check-{name}.json"
        argv = [
            "check-data",
            str(output / "data" / f"{name}.jsonl"),
            "--output",
            str(report),
            "--sample",
            "0",
        ]
        assert main([*argv, "--model", str(output / "runs" / "sft" / "final")]) == 0
        assert json.loads(report.read_text())["reference"]["ranking_average"] == pytest.approx(reference[key])


def test_online_vs_offline_measures_the_start_and_both_policies_with_the_true_reward(quick):
    results = json.loads((quick["online-vs-offline"] / "results.json").read_text())
    assert list(results["policies"]) == ["starting policy (SFT)", "offline DPO", "online DPO"]
    start = results["policies"]["starting policy (SFT)"]
    assert start["kl_to_start"] == 0 and start["win_rate_vs_start"] == 0.5
    assert [row["round"] for row in results["online_rounds"]] == [1, 2]
    assert all(-1 <= p["true_reward"] <= 1 for p in results["policies"].values())


@pytest.mark.slow
def test_online_vs_offline_full(tmp_path):
    """At seed 0, online DPO with a reward model beats offline DPO on the true reward, spending more KL."""
    _, run = EXPERIMENTS["online-vs-offline"]
    policies = run(tmp_path, 0, False)["policies"]
    start, offline, online = (policies[k] for k in ("starting policy (SFT)", "offline DPO", "online DPO"))
    assert offline["true_reward"] > start["true_reward"] + 0.3
    assert online["true_reward"] > offline["true_reward"] + 0.1
    assert online["kl_to_start"] > offline["kl_to_start"]


@pytest.mark.slow
def test_frontier_full(tmp_path):
    """Every method gains true reward over the reference, more with less KL regularization; PPO with
    the true reward stands on or above DPO's frontier at KL > 1; best-of-N rises with N (measured
    over seeds 0–2: see docs/experiments.md)."""
    _, run = EXPERIMENTS["frontier"]
    results = run(tmp_path, 0, False)
    points = {(p["method"], p["setting"]): p for p in results["points"]}
    dpo = [points["DPO", f"β={beta}"] for beta in (3.0, 1.0, 0.3, 0.1)]
    assert [p["reward"] for p in dpo] == sorted(p["reward"] for p in dpo)  # smaller β, more reward
    assert all(p["reward"] > results["reference_reward"] + 0.3 for p in dpo)
    assert points["PPO (true reward)", "β=0.05"]["reward"] > 0.9
    assert all(g["gap"] > 0 for g in results["gaps_to_dpo"]["PPO (true reward)"] if g["kl"] > 1)
    best = [p["reward"] for p in results["points"] if p["method"] == "best-of-N"]
    assert best == sorted(best)
