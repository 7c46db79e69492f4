"""The built-in demo is a real end-to-end run whose success is measured by the true reward."""

from preftune.demo import run_demo


def test_quick_demo_policy_beats_its_starting_policy_on_the_true_reward(tmp_path):
    report = run_demo(str(tmp_path), quick=True)
    assert report["win_rate_dpo_vs_sft"] > 0.6
    assert report["true_reward_dpo"] > report["true_reward_sft"]
    assert report["heldout_reward_accuracy"] > 0.6
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "report.json").is_file()
