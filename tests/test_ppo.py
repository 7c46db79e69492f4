"""PPO: the critic's initialization, the log-probs of the distribution sampled, a short run that raises
the true reward, an exact resume, the guard, and the command (the pure pieces: test_ppo_losses.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import quiet_config

from preftune.config import load_config
from preftune.data.layouts import collate_sequences
from preftune.data.sft import TokenizedSequence
from preftune.errors import ConfigError
from preftune.evaluation.samples import sample_report
from preftune.evaluation.settings import EvalSettings
from preftune.experiments.common import Lab, one_thread
from preftune.experiments.synthetic import SentimentTask, tiny_llama, tiny_reward_model, true_reward
from preftune.generation.scoring import RewardModelScorer
from preftune.losses.ppo import value_loss
from preftune.model.logps import LogpsRequest, sequence_logps
from preftune.model.reward_head import sequence_rewards, token_values
from preftune.recipes.ppo import train_ppo
from preftune.recipes.ppo_experience import build_critic

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
        ours = sequence_logps(
            model, collate_sequences(rows, 0), LogpsRequest(per_token=True, temperature=0.7)
        )
        plain = sequence_logps(model, collate_sequences(rows, 0), LogpsRequest(per_token=True))
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
    saved = tmp_path / "b" / "ppo" / "checkpoint-2"
    state = json.loads((saved / "preftune_state.json").read_text())
    assert state["kl_coef"] != 0.05 and (saved / "value" / "model.safetensors").exists()
    resumed = run_ppo(tmp_path / "b", tokenizer, *adaptive, "train.resume=true")
    from safetensors.torch import load_file

    for part in ("final/model.safetensors", "checkpoint-3/value/model.safetensors"):
        a, b = (load_file(tmp_path / run / "ppo" / part) for run in ("a", "b"))
        assert all(torch.equal(a[name], b[name]) for name in a), part
    strip = ("rollouts_per_second", "tokens_per_second")  # timings
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
        sampling = EvalSettings(samples=32, max_new_tokens=8, seed=9)
        report = sample_report(policy, reference, lab.tokenizer, held_out, TrueReward(), sampling)
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
    ("environment", "message"),
    [
        ({"WORLD_SIZE": "2"}, "ppo: runs on one process for now"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "ppo: DEEPSPEED launches are not supported yet"),
        ({"ACCELERATE_USE_FSDP": "true"}, "ppo: FSDP launches are not supported yet"),
    ],
)
def test_launches_ppo_cannot_honour_are_refused_before_any_model_loads(
    tmp_path, tokenizer, monkeypatch, environment, message
):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        train_ppo(ppo_config(tmp_path), model=object(), tokenizer=tokenizer, prompts=[{"prompt": "a"}])


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
        "--reward", "preftune.experiments.synthetic:true_reward", "--kl-coef", "0.1", "--steps", "2",
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

    from preftune.engine.guard import StopRequested

    class SignalAtCall(Characters):
        calls = 0

        def __call__(self, prompts, completions):
            SignalAtCall.calls += 1
            if SignalAtCall.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(prompts, completions)

    run_ppo(tmp_path / "a", tokenizer)
    with pytest.raises(StopRequested, match=r"after step 2; saved .*checkpoint-2") as stopped:
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
    from preftune.engine.guard import NonFiniteError
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
    assert (
        config.reward.scorer == "preftune.experiments.synthetic:true_reward"
        and config.train.output_dir == "runs/ppo"
    )
