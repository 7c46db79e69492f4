"""The built-in demo is a real end-to-end run whose success is measured by the true reward."""

import json

import pytest

from preftune.experiments.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(str(out), quick=True)


def test_quick_demo_policies_beat_their_starting_policy_on_the_true_reward(demo):
    _, report = demo
    assert report["win_rate_dpo_vs_sft"] > 0.6
    assert report["win_rate_vs_sft_dpop"] > 0.55
    assert report["true_reward_dpo"] > report["true_reward_sft"]
    assert report["heldout_accuracy_dpo"] > 0.6


def test_dpop_keeps_the_chosen_likelihood_higher_than_dpo_does(demo):
    _, report = demo
    assert report["heldout_chosen_logp_drift_dpop"] > report["heldout_chosen_logp_drift_dpo"]


def test_demo_writes_its_report_curves_and_pairs(demo):
    out, report = demo
    assert json.loads((out / "report.json").read_text()) == pytest.approx(report)
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "dpo" / "final" / "model.safetensors").is_file()
    first_pair = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert set(first_pair) == {"prompt", "chosen", "rejected"}
