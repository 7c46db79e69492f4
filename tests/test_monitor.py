"""The gold-vs-proxy monitor: its verdict on crafted trajectories, and what online DPO and PPO do on
it (warn; with ``reward.stop_on_overoptimization``, stop keeping the policy the monitor scored best)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quiet_config
from safetensors.torch import load_file

from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.evaluation.monitor import OveroptimizationMonitor
from preftune.experiments.common import one_thread
from preftune.experiments.synthetic import SentimentTask, tiny_llama
from preftune.generation.rollout import TransformersRollout
from preftune.recipes.online import train_online
from preftune.recipes.ppo import train_ppo

# A proxy that keeps rising while the gold reward peaks at the second point and falls.
PROXY = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
GOLD = [0.2, 0.6, 0.5, 0.3, 0.1, 0.0]


def trajectory(patience, stop=False, proxy=PROXY, gold=GOLD):
    monitor = OveroptimizationMonitor(patience, stop)
    return monitor, [
        monitor.add(i + 1, p, g, kl=float(i)) for i, (p, g) in enumerate(zip(proxy, gold, strict=True))
    ]


def test_the_monitor_warns_once_the_reward_rose_and_the_monitor_fell_at_each_of_the_last_n_rounds():
    """Patience 2: the gold reward falls from round 2 to 3 and 3 to 4 while the proxy rises, so
    round 4 is the first verdict of overoptimization; every later round too."""
    _, verdicts = trajectory(patience=2)
    assert [v.overoptimized for v in verdicts] == [False, False, False, True, True, True]
    assert verdicts[3].message == (
        "overoptimization: over the last 2 rounds the reward rose from +1.000 to +3.000 while the monitor "
        "fell from +0.600 to +0.300 (KL 1.00 -> 3.00 nats); the monitor was best at round 2 (+0.600, KL 1.00); "
        "reward.stop_on_overoptimization=true would stop the run there"
    )
    assert not any(v.stop for v in verdicts)


def test_a_longer_patience_waits_for_more_falling_rounds():
    _, verdicts = trajectory(patience=4)
    assert [v.overoptimized for v in verdicts] == [False] * 5 + [True]


def test_no_warning_while_the_monitor_rises_with_the_reward_or_the_reward_falls_with_it():
    _, rising = trajectory(2, gold=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    _, falling = trajectory(2, proxy=[5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert not any(v.overoptimized for v in rising + falling)


def test_with_stop_the_verdict_asks_to_stop_and_names_the_best_point_by_the_monitor():
    monitor, verdicts = trajectory(patience=2, stop=True)
    assert verdicts[3].stop and verdicts[3].best["at"] == 2 and monitor.best()["monitor"] == 0.6
    assert verdicts[3].message.endswith("; stopping, final/ is the policy of round 2")
    assert [v.is_best for v in verdicts] == [True, True, False, False, False, False]


def judged(monitor, sem):
    """The verdicts on PROXY and GOLD, each monitor mean with the standard error ``sem``."""
    points = enumerate(zip(PROXY, GOLD, strict=True))
    return [monitor.add(i + 1, p, g, float(i), monitor_sem=sem).overoptimized for i, (p, g) in points]


def test_a_fall_within_the_monitors_noise_does_not_warn():
    """GOLD falls by 0.3 to 0.4 over two rounds. With a standard error of 0.15 per mean, a fall
    must pass 2 × 0.21 = 0.42: chance, no warning. With 0.1 (threshold 0.28) it warns as before."""
    assert judged(OveroptimizationMonitor(2), sem=0.15) == [False] * 6
    assert judged(OveroptimizationMonitor(2), sem=0.1) == [False, False, False, True, True, True]


def test_with_noise_z_0_any_fall_counts():
    assert judged(OveroptimizationMonitor(2, noise_z=0.0), sem=0.15) == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]


def test_a_restored_monitor_judges_the_next_point_as_the_uninterrupted_one():
    _, verdicts = trajectory(patience=2)
    resumed = OveroptimizationMonitor(2)
    partial, _ = trajectory(2, proxy=PROXY[:3], gold=GOLD[:3])
    resumed.restore(json.loads(json.dumps(partial.state())))
    assert resumed.add(4, PROXY[3], GOLD[3], 3.0) == verdicts[3]


# --------------------------------------------------------------------------- online DPO on it


class Scripted:
    """Each call (one per round: all of a round's samples at once) answers the next value of
    ``script``, plus the completion's length / 1000 so that samples differ and pair."""

    def __init__(self, name, script):
        self.name, self.script, self.calls = name, script, 0

    def __call__(self, prompts, completions):
        value = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return [value + len(c) / 1000 for c in completions]


def run_online(tmp_path, tokenizer, *overrides):
    config = quiet_config(
        str(tmp_path / "online"), "train.batch_size=4", "train.learning_rate=5e-3", "online.rounds=4",
        "online.samples_per_prompt=4", "rollout.max_new_tokens=6", "reward.monitor_patience=2", *overrides,
    )  # fmt: skip
    return train_online(
        config,
        model=tiny_llama(len(tokenizer), seed=0),
        tokenizer=tokenizer,
        prompts=[{"prompt": p} for p in SentimentTask().prompts(8, 0)],
        scorer=Scripted("proxy", PROXY),
        monitor=Scripted("gold", GOLD),
        rollout_for=lambda m: TransformersRollout(m, tokenizer.pad_token_id, [tokenizer.eos_token_id]),
    )


def test_online_dpo_warns_on_overoptimization_and_trains_on_without_the_stop_setting(
    tmp_path, tokenizer, capsys
):
    result = run_online(tmp_path, tokenizer)
    assert "overoptimization: over the last 2 rounds" in capsys.readouterr().out
    assert [row["overoptimized"] for row in result.rounds] == [False, False, False, True]
    assert [row["monitor_best_at"] for row in result.rounds] == [1, 2, 2, 2]
    assert result.final["overoptimized"]  # the final policy's samples are a fifth point, still parting
    rows = [json.loads(line) for line in (tmp_path / "online" / "rounds.jsonl").read_text().splitlines()]
    assert [round(row["monitor_mean"], 1) for row in rows] == GOLD[:4]
    assert all(row.get("train_steps") for row in rows)


def test_online_dpo_stops_on_overoptimization_keeping_the_policy_the_monitor_scored_best(
    tmp_path, tokenizer, capsys
):
    result = run_online(tmp_path, tokenizer, "reward.stop_on_overoptimization=true")
    assert "stopping, final/ is the policy of round 2" in capsys.readouterr().out
    assert [row["round"] for row in result.rounds] == [1, 2, 3, 4] and result.rounds[-1]["stopped"]
    out = tmp_path / "online"
    assert not (out / "round-04" / "train").exists()  # the stopped round samples, and trains no more
    best = load_file(out / "round-01" / "train" / "final" / "model.safetensors")  # the policy of round 2
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert "on overoptimization; the policy of round 2" in (out / "final" / "README.md").read_text()
    assert result.final is None


def test_stop_on_overoptimization_without_a_monitor_is_refused_before_anything_loads(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"reward\.stop_on_overoptimization: needs a monitor"):
        train_online(
            quiet_config(str(tmp_path), "reward.stop_on_overoptimization=true", "reward.scorer=x:y"),
            model=object(),
            tokenizer=tokenizer,
            prompts=[{"prompt": "a"}],
        )


def test_monitor_keys_belong_to_the_commands_that_sample():
    with pytest.raises(ConfigError, match=r"reward\.monitor is read by 'preftune online', 'preftune ppo'"):
        load_config(overrides=["reward.monitor=x:y"], command="rm train")


# --------------------------------------------------------------------------- PPO on it


def run_ppo(tmp_path, tokenizer, *overrides, **kwargs):
    config = quiet_config(
        str(tmp_path / "ppo"), "train.batch_size=8", "train.learning_rate=2e-3", "ppo.steps=6",
        "ppo.rollouts_per_step=8", "ppo.ppo_epochs=1", "ppo.num_mini_batches=1", "rollout.max_new_tokens=6",
        "train.save_every=1", "reward.monitor_patience=2", *overrides,
    )  # fmt: skip
    with one_thread():
        return train_ppo(
            config,
            model=tiny_llama(len(tokenizer), seed=0),
            tokenizer=tokenizer,
            prompts=[{"prompt": p} for p in SentimentTask().prompts(16, 0)],
            scorer=kwargs.pop("scorer", None) or Scripted("proxy", PROXY),
            monitor=Scripted("gold", GOLD),
            **kwargs,
        )


def test_ppo_logs_the_monitor_beside_the_reward_and_warns_at_the_logged_step_where_they_part(
    tmp_path, tokenizer, capsys
):
    result = run_ppo(tmp_path, tokenizer)
    assert "step 4: overoptimization: over the last 2 steps" in capsys.readouterr().out
    assert [round(row["objective/monitor_scores"], 1) for row in result.history] == GOLD
    assert [row["monitor/overoptimized"] for row in result.history] == [0, 0, 0, 1, 1, 1]
    assert [row["monitor/best_step"] for row in result.history] == [1, 2, 2, 2, 2, 2]
    assert (tmp_path / "ppo" / "best-by-monitor" / "monitor.json").exists()


def test_ppo_stops_on_overoptimization_keeping_the_policy_of_the_step_the_monitor_scored_best(
    tmp_path, tokenizer
):
    result = run_ppo(
        tmp_path, tokenizer, "reward.stop_on_overoptimization=true", "train.save_total_limit=null"
    )
    assert result.steps == 4 and [row["step"] for row in result.history] == [1, 2, 3, 4]
    out = tmp_path / "ppo"
    best = load_file(out / "checkpoint-2" / "model.safetensors")  # the policy after step 2
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert json.loads((out / "best-by-monitor" / "monitor.json").read_text())["at"] == 2
    assert "the logged step the monitor scored best" in (out / "final" / "README.md").read_text()
    assert result.final_dir == out / "final"


def test_a_negative_noise_z_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"reward\.monitor_noise_z.*must be >= 0"):
        load_config(overrides=["reward.monitor_noise_z=-1"], command="online")
