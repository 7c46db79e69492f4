"""PPO: the pure pieces against hand-computed values, the critic's initialization, the log-probs of
the distribution sampled, a short run that raises the true reward, and an exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import quiet_config

from preftune.config import load_config
from preftune.data.sft import TokenizedSequence
from preftune.errors import ConfigError
from preftune.experiments.common import Lab, one_thread
from preftune.layouts import collate_sequences
from preftune.logps import batch_logps
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
from preftune.recipes.ppo import train_ppo
from preftune.recipes.ppo_rollouts import build_critic
from preftune.reward_model import sequence_rewards, token_values
from preftune.sampling import sample_report
from preftune.scoring import RewardModelScorer
from preftune.synthetic import SentimentTask, tiny_llama, tiny_reward_model, true_reward

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


# --------------------------------------------------------------------------- the critic


def sequences_of(tokenizer, prompts_and_completions):
    rows = []
    for i, (prompt, completion) in enumerate(prompts_and_completions):
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(TokenizedSequence([*p, *c], [0] * len(p) + [1] * len(c), i))
    return rows


def test_a_critic_initialized_from_the_reward_model_values_every_prefix_as_the_reward_model_scores_it(
    tmp_path, tokenizer
):
    reward_model = tiny_reward_model(len(tokenizer), seed=4)
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"), device="cpu")
    config = load_config(overrides=["ppo.value_model=auto"])
    critic, source = build_critic(config, tiny_llama(len(tokenizer)), scorer, tokenizer, print)
    assert "reward model" in source
    rows = sequences_of(tokenizer, [("review of the park:", " great calm day"), ("a", " dull")])
    batch = collate_sequences(rows, tokenizer.pad_token_id)
    with torch.no_grad(), one_thread():
        values = token_values(critic, batch)
        # The value before each completion token is the reward model's score of the prefix up to there.
        prefixes = [
            row.input_ids[:k] for row in rows for k in range(row.loss_mask.index(1), len(row.input_ids))
        ]
        scores = torch.cat(
            [
                sequence_rewards(scorer.model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
                for p in prefixes
            ]
        )
    torch.testing.assert_close(values, scores)
    assert all(a is not b for a, b in zip(critic.parameters(), scorer.model.parameters(), strict=True))


def test_a_critic_from_the_policy_copies_its_backbone_and_starts_at_zero_with_a_reward_function(tokenizer):
    policy = tiny_llama(len(tokenizer), seed=2)

    class Function:
        name = "fn"

    critic, source = build_critic(load_config(), policy, Function(), tokenizer, print)
    assert source.startswith("the policy's backbone")
    backbone = critic.model.state_dict()
    assert all(torch.equal(t, backbone[k]) for k, t in policy.model.state_dict().items())
    batch = collate_sequences(
        sequences_of(tokenizer, [("review of the park:", " great")]), tokenizer.pad_token_id
    )
    assert torch.equal(token_values(critic, batch), torch.zeros(batch.label_index.shape[0]))
    with pytest.raises(ConfigError, match=r"ppo\.value_model: 'reward' needs"):
        build_critic(load_config(overrides=["ppo.value_model=reward"]), policy, Function(), tokenizer, print)


# --------------------------------------------------------------------------- the sampled distribution


def test_token_log_probs_are_those_of_the_temperature_scaled_distribution_generate_sampled_from(tokenizer):
    model = tiny_llama(len(tokenizer), seed=5).eval()
    prompt = tokenizer("review of the park:", return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    out = model.generate(
        prompt, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6,
        return_dict_in_generate=True, output_scores=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    completion = out.sequences[0, prompt.shape[1] :].tolist()
    completion = completion[: completion.index(2) + 1] if 2 in completion else completion  # cut at EOS
    sampled = torch.stack(
        [torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, completion, strict=False)]
    )
    rows = [
        TokenizedSequence(prompt[0].tolist() + completion, [0] * prompt.shape[1] + [1] * len(completion), 0)
    ]
    with torch.no_grad():
        ours = batch_logps(model, collate_sequences(rows, 0), with_token_logps=True, temperature=0.7)
        plain = batch_logps(model, collate_sequences(rows, 0), with_token_logps=True)
    assert not torch.allclose(plain.token_logps, sampled, atol=1e-3)  # temperature 1 would not match
    torch.testing.assert_close(ours.token_logps, sampled, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- runs


def ppo_config(tmp_path, *overrides):
    return quiet_config(
        str(tmp_path / "ppo"),
        "train.batch_size=8",
        "train.learning_rate=2e-3",
        "ppo.steps=3",
        "ppo.rollouts_per_step=8",
        "ppo.ppo_epochs=2",
        "ppo.num_mini_batches=2",
        "rollout.max_new_tokens=6",
        *overrides,
    )


class Characters:
    """Reward = characters in the completion / 20: a signal even an untrained model's samples vary in."""

    name = "characters"

    def __call__(self, prompts, completions):
        return [len(c) / 20 for c in completions]


class TrueReward:
    name = "true reward"

    def __call__(self, prompts, completions):
        return true_reward(list(prompts), list(completions))


def run_ppo(tmp_path, tokenizer, *overrides, scorer=None, **kwargs):
    with one_thread():  # tiny models: a second thread only waits on a busy machine
        return train_ppo(
            ppo_config(tmp_path, *overrides),
            model=tiny_llama(len(tokenizer), seed=0),
            tokenizer=tokenizer,
            prompts=[{"prompt": p} for p in SentimentTask().prompts(16, 0)],
            scorer=scorer or Characters(),
            **kwargs,
        )


def test_resuming_an_interrupted_run_ends_exactly_where_the_uninterrupted_run_ends(tmp_path, tokenizer):
    adaptive = ("train.save_every=1", "ppo.target_kl=0.5", "ppo.kl_horizon=50", "ppo.kl_estimator=k3")
    straight = run_ppo(tmp_path / "a", tokenizer, *adaptive)
    stopped = run_ppo(tmp_path / "b", tokenizer, *adaptive, stop_after=2)
    assert stopped.final_dir is None and stopped.steps == 2
    saved = tmp_path / "b" / "ppo" / "checkpoint-0000002"
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["kl_coef"] != 0.05 and (saved / "value" / "model.safetensors").exists()
    resumed = run_ppo(tmp_path / "b", tokenizer, *adaptive, "train.resume=true")
    from safetensors.torch import load_file

    for part in ("final/model.safetensors", "checkpoint-0000003/value/model.safetensors"):
        a, b = (load_file(tmp_path / run / "ppo" / part) for run in ("a", "b"))
        assert all(torch.equal(a[name], b[name]) for name in a), part
    strip = ("rollouts_per_second",)
    rows = [
        [{k: v for k, v in row.items() if k not in strip} for row in r.history] for r in (straight, resumed)
    ]
    assert rows[1] == rows[0][2:]  # the resumed run logged step 3 exactly as the straight run did
    assert rows[0][2]["loss/value_avg"] > 0 and rows[0][2]["objective/kl"] != 0  # it did train
    logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == [1, 2, 3]


def test_ppo_on_the_synthetic_task_raises_the_true_reward_of_an_sft_policy(tmp_path):

    with one_thread():
        lab = Lab(tmp_path / "lab", seed=0, quick=True)
        task = SentimentTask()
        reference = lab.sft(task, 20)
        policy = copy.deepcopy(reference)
        config = ppo_config(
            tmp_path, "train.batch_size=16", "ppo.steps=6", "ppo.rollouts_per_step=16", "ppo.ppo_epochs=4",
            "ppo.num_mini_batches=1", "rollout.max_new_tokens=8",
        )  # fmt: skip
        prompts = [{"prompt": p} for p in task.prompts(64, 1)]
        train_ppo(config, model=policy, tokenizer=lab.tokenizer, prompts=prompts, scorer=TrueReward())
        held_out = {
            tuple(lab.tokenizer(task.prompt(t))["input_ids"]): task.prompt(t) for t in ("park", "song")
        }
        report = sample_report(policy, reference, lab.tokenizer, held_out, TrueReward(), 32, 8, seed=9)
    assert report["reward_policy"] > report["reward_reference"] + 0.2
    assert report["kl_policy_reference"] > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.top_k=5", "rollout: PPO samples from π"),
        ("rollout.temperature=0", "rollout: PPO samples from π"),
        ("train.grad_accum=2", "train.grad_accum: PPO splits"),
        ("train.max_steps=3", "train.max_steps: PPO counts its steps in ppo.steps"),
    ],
)
def test_settings_that_would_break_ppo_are_refused_before_any_model_loads(
    tmp_path, tokenizer, override, message
):
    with pytest.raises(ConfigError, match=message):
        train_ppo(
            ppo_config(tmp_path, override),
            model=object(),
            tokenizer=tokenizer,
            prompts=[{"prompt": "a"}],
            scorer=TrueReward(),
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.num_mini_batches=3", "ppo.num_mini_batches: must divide ppo.rollouts_per_step"),
        ("ppo.lam=1.5", r"ppo.lam: must be in \[0, 1\]"),
        ("ppo.target_kl=0", "ppo.target_kl: must be > 0"),
        ("ppo.kl_estimator=k2", "ppo.kl_estimator: 'k2' is not one of"),
        ("ppo.cliprange=-0.1", "ppo.cliprange: must be >= 0"),
    ],
)
def test_bad_ppo_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_preftune_ppo_trains_from_files_and_saves_the_final_policy(tmp_path, tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    from preftune.cli import main

    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SentimentTask().prompts(8, 0)))
    argv = [
        "ppo", "--model", str(tmp_path / "base"), "--prompts", str(prompts),
        "--reward", "preftune.synthetic:true_reward", "--kl-coef", "0.1", "--steps", "2",
        "--output", str(tmp_path / "out"), "--set", "ppo.rollouts_per_step=4", "--set", "train.batch_size=4",
        "--set", "rollout.max_new_tokens=4", "--set", "train.report_to=none", "--set", "train.progress=false",
    ]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kl_coef 0.1 (k1)" in out and "critic: the policy's backbone" in out
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2] and rows[0][
        "objective/kl_coef"
    ] == 0.1  # log_every 10: the last
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert "| kind" not in (tmp_path / "out" / "final" / "README.md").read_text()


def test_with_lora_the_reference_is_the_policy_with_its_adapters_off(tmp_path, tokenizer):
    result = run_ppo(tmp_path, tokenizer, "model.lora=true", "train.learning_rate=1e-2", "ppo.steps=2")
    first, second = result.history
    assert first["objective/kl"] == 0.0  # new adapters change nothing yet: policy and reference agree
    assert second["objective/kl"] != 0.0  # the adapters trained; with them off, the reference did not move
    assert (tmp_path / "ppo" / "final" / "model.safetensors").exists()  # merged, as train saves LoRA runs


def test_a_signal_finishes_the_step_checkpoints_it_and_the_resumed_run_ends_like_an_uninterrupted_one(
    tmp_path, tokenizer
):
    import os
    import signal

    from preftune.guard import StopRequested

    class SignalAtCall(Characters):
        calls = 0

        def __call__(self, prompts, completions):
            SignalAtCall.calls += 1
            if SignalAtCall.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(prompts, completions)

    run_ppo(tmp_path / "a", tokenizer)
    with pytest.raises(StopRequested, match=r"after step 2; saved .*checkpoint-0000002") as stopped:
        run_ppo(tmp_path / "b", tokenizer, scorer=SignalAtCall())
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    run_ppo(tmp_path / "b", tokenizer, "train.resume=true")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "ppo" / "final" / "model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_non_finite_update_stops_the_run_naming_the_step_or_is_skipped_and_counted(
    tmp_path, tokenizer, monkeypatch
):
    import preftune.recipes.ppo as recipe
    from preftune.guard import NonFiniteError
    from preftune.losses.ppo import Clipped

    def poisoned(*args, **kwargs):
        out = value_loss(*args, **kwargs)
        return Clipped(out.loss * float("nan"), out.clipped)

    monkeypatch.setattr(recipe, "value_loss", poisoned)
    with pytest.raises(NonFiniteError, match=r"step 1: the loss \(nan\) or gradient norm .* not finite"):
        run_ppo(tmp_path / "stop", tokenizer)
    result = run_ppo(tmp_path / "skip", tokenizer, "train.nonfinite=skip", "train.max_skipped_steps=100")
    assert [row["skipped_updates"] for row in result.history] == [
        4.0,
        8.0,
        12.0,
    ]  # 2 epochs x 2 mini-batches a step
    assert not (tmp_path / "stop" / "ppo" / "final").exists()


def test_a_scorer_that_leaves_a_completion_unscored_stops_ppo_naming_it(tmp_path, tokenizer):
    from preftune.errors import ScorerError

    class Unscored:
        name = "partial"

        def __call__(self, prompts, completions):
            return [None, *[1.0] * (len(completions) - 1)]

    with pytest.raises(ScorerError, match="partial: no finite score for 1 of 8 completions"):
        run_ppo(tmp_path, tokenizer, scorer=Unscored())


def test_the_example_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parent.parent / "examples" / "ppo.yaml")
    assert config.ppo.reward == "preftune.synthetic:true_reward" and config.train.output_dir == "runs/ppo"
