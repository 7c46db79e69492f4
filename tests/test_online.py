"""Online DPO: the rollout, the pair rules, the rounds and their resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import quiet_config

from preftune.config import load_config
from preftune.config.rl import RolloutConfig
from preftune.data.prompts import Prompt
from preftune.errors import ConfigError, DataError
from preftune.experiments.synthetic import SentimentTask, tiny_llama
from preftune.generation.pair_rules import build_pairs
from preftune.generation.rollout import Completion, TransformersRollout
from preftune.recipes.online import score_samples, train_online

GREEDY = RolloutConfig(max_new_tokens=6, temperature=0.0, batch_size=8)


def rollout_of(model, tokenizer):
    return TransformersRollout(model, tokenizer.pad_token_id, [tokenizer.eos_token_id])


# --------------------------------------------------------------------------- rollout


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone_under_greedy_decoding(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    prompts = [
        tokenizer(text)["input_ids"]
        for text in ("review of the park:", "a", "review of the long trip today:")
    ]
    assert len({len(p) for p in prompts}) == 3  # three lengths: the batch really is padded
    batched = rollout_of(model, tokenizer).generate(prompts, GREEDY, seed=0)
    alone = [rollout_of(model, tokenizer).generate([p], GREEDY, seed=0)[0] for p in prompts]
    assert batched == alone
    assert all(len(c.ids) == GREEDY.max_new_tokens or c.ended for c in batched)


def test_the_same_seed_draws_the_same_samples_and_leaves_the_callers_random_stream_alone(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    prompts = [tokenizer("review of the park:")["input_ids"]] * 8
    params = RolloutConfig(max_new_tokens=6, temperature=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = rollout_of(model, tokenizer).generate(prompts, params, seed=7)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert rollout_of(model, tokenizer).generate(prompts, params, seed=7) == first
    assert rollout_of(model, tokenizer).generate(prompts, params, seed=8) != first


def test_top_k_of_one_samples_the_greedy_completion(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    prompts = [tokenizer("review of the park:")["input_ids"]]
    top1 = RolloutConfig(max_new_tokens=6, temperature=1.0, top_k=1)
    assert rollout_of(model, tokenizer).generate(prompts, top1, seed=1) == rollout_of(
        model, tokenizer
    ).generate(prompts, GREEDY, seed=0)


# --------------------------------------------------------------------------- pair rules

IDS = [[[k] for k in range(4)]]  # one prompt, four different completions


def test_best_worst_pairs_the_highest_with_the_lowest_reward():
    triples, counts = build_pairs([[0.2, 0.9, -0.5, 0.1]], IDS, "best_worst")
    assert triples == [(0, 1, 2)]
    assert (counts.pairs, counts.ties, counts.prompts_without_pair) == (1, 0, 0)


def test_a_prompt_whose_samples_all_tie_gives_no_pair_and_is_counted():
    triples, counts = build_pairs([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0]], IDS * 2, "best_worst")
    assert triples == [(1, 0, 3)]  # equal rewards keep sample order: the first best, the last worst
    assert (counts.ties, counts.prompts_without_pair) == (1, 1)


def test_best_random_rejects_one_of_the_lower_rewarded_samples_reproducibly():
    rewards = [[0.9, 0.9, 0.1, 0.3]]
    draws = {build_pairs(rewards, IDS, "best_random", seed=s)[0][0] for s in range(20)}
    assert draws == {(0, 0, 2), (0, 0, 3)}  # never the other 0.9
    assert build_pairs(rewards, IDS, "best_random", seed=4) == build_pairs(
        rewards, IDS, "best_random", seed=4
    )


def test_all_above_gap_keeps_every_pair_far_enough_apart_and_counts_the_rest():
    triples, counts = build_pairs([[0.0, 1.0, 0.5, 0.5]], IDS, "all_above_gap", min_gap=0.6)
    assert triples == [(0, 1, 0)]
    # 6 candidate pairs: one kept, one tie (0.5, 0.5), four closer than 0.6
    assert (counts.pairs, counts.ties, counts.below_gap) == (1, 1, 4)


def test_unscored_samples_are_left_out_and_identical_completions_never_pair():
    ids = [[[7], [7], [8], [9]]]
    triples, counts = build_pairs([[1.0, 0.0, None, math.nan]], ids, "best_worst")
    assert triples == [] and (counts.unscored, counts.identical) == (2, 1)


# --------------------------------------------------------------------------- scoring


class LengthScorer:
    """Reward = words in the completion; None for completions starting with 'bad' (unscored)."""

    name = "length"

    def __call__(self, prompts, completions):
        return [None if c.strip().startswith("bad") else float(len(c.split())) for c in completions]


def test_a_completion_without_eos_pays_the_missing_eos_penalty(tokenizer):
    prompts = [Prompt("p", [1, 5], "record 0")]
    eos = tokenizer.eos_token_id
    good, cut = (
        tokenizer(" good day", add_special_tokens=False)["input_ids"],
        tokenizer(" good", add_special_tokens=False)["input_ids"],
    )
    completions = [Completion([*good, eos], True), Completion(cut, False)]
    rows = score_samples(prompts, 2, completions, LengthScorer(), tokenizer, missing_eos_penalty=1.5)
    assert [row["score"] for row in rows] == [2.0, 1.0]
    assert [row["reward"] for row in rows] == [2.0, -0.5]
    assert [row["eos"] for row in rows] == [True, False]


# --------------------------------------------------------------------------- rounds


def online_config(tmp_path, *overrides):
    return quiet_config(
        str(tmp_path / "online"),
        "train.batch_size=4",
        "train.learning_rate=5e-3",
        "online.rounds=2",
        "online.samples_per_prompt=4",
        "rollout.max_new_tokens=6",
        *overrides,
    )


def sentiment_prompts(n=8):
    return [{"prompt": p} for p in SentimentTask().prompts(n, 0)]


class CountingRollout(TransformersRollout):
    calls = 0

    def generate(self, *args, **kwargs):
        CountingRollout.calls += 1
        return super().generate(*args, **kwargs)


def run_online(tmp_path, tokenizer, *overrides, **kwargs):
    model = tiny_llama(len(tokenizer), seed=0)
    return train_online(
        online_config(tmp_path, *overrides),
        model=model,
        tokenizer=tokenizer,
        prompts=sentiment_prompts(),
        scorer=LengthScorer(),
        rollout_for=lambda m: CountingRollout(m, tokenizer.pad_token_id, [tokenizer.eos_token_id]),
        **kwargs,
    )


def test_each_round_saves_its_samples_pairs_and_policy_and_the_run_its_summary(tmp_path, tokenizer):
    result = run_online(tmp_path, tokenizer)
    out = tmp_path / "online"
    for r in (1, 2):
        samples = (out / f"round-0{r}" / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 8 * 4
        pairs = [json.loads(line) for line in (out / f"round-0{r}" / "pairs.jsonl").read_text().splitlines()]
        assert len(pairs) == result.rounds[r - 1]["pairs"] > 0
        assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
        assert (out / f"round-0{r}" / "train" / "final" / "model.safetensors").exists()
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "README.md").exists()
    summary = json.loads((out / "online.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2] and summary["final"]["round"] == "final"
    assert result.rounds[0]["kl_to_initial"] == 0.0 and result.rounds[1]["kl_to_initial"] != 0.0
    assert [json.loads(line)["round"] for line in (out / "rounds.jsonl").read_text().splitlines()] == [1, 2]


def test_an_interrupted_round_resumes_reusing_its_samples_and_ends_as_an_uninterrupted_run(
    tmp_path, tokenizer
):
    straight = run_online(tmp_path / "a", tokenizer)
    stopped = run_online(tmp_path / "b", tokenizer, "train.save_every=1", stop_in_round=(2, 1))
    assert [row["round"] for row in stopped.rounds] == [1] and stopped.final_dir is None
    CountingRollout.calls = 0
    resumed = run_online(tmp_path / "b", tokenizer, "train.save_every=1", "train.resume=true")
    assert CountingRollout.calls == 1  # round 2's samples were read back; only the final policy sampled

    def timeless(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert timeless(resumed.rounds) == timeless(straight.rounds)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "online" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "online" / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_second_run_into_the_same_folder_is_refused_without_resume_or_overwrite(tmp_path, tokenizer):
    run_online(tmp_path, tokenizer, "online.rounds=1", "online.final_samples=false")
    with pytest.raises(ConfigError, match="holds an earlier online run"):
        run_online(tmp_path, tokenizer, "online.rounds=1")


def test_unscored_samples_are_counted_and_a_round_without_any_pair_stops_with_advice(tmp_path, tokenizer):
    class HalfUnscored:  # the other half all tie: no pair
        name = "half"

        def __call__(self, prompts, completions):
            return [None if i % 2 else 1.0 for i in range(len(completions))]

    with pytest.raises(ConfigError, match=r"no pair could be built.*32 unscored"):
        train_online(
            online_config(tmp_path, "online.samples_per_prompt=8"),
            model=tiny_llama(len(tokenizer)),
            tokenizer=tokenizer,
            prompts=sentiment_prompts(),
            scorer=HalfUnscored(),
        )


def test_a_prompts_file_without_prompts_names_the_line_and_field(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "review of the park:"}\n{"question": "x"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        train_online(
            online_config(tmp_path, f"prompts.path={path}"),
            model=tiny_llama(len(tokenizer)),
            tokenizer=tokenizer,
            scorer=LengthScorer(),
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("online.samples_per_prompt=1", "online.samples_per_prompt: must be >= 2"),
        ("rollout.top_p=0", "rollout.top_p: must be in"),
        ("rollout.temperature=-1", "rollout.temperature: must be >= 0"),
        ("online.pair_rule=best", "online.pair_rule: 'best' is not one of"),
    ],
)
def test_bad_online_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_online_dpo_on_the_synthetic_task_raises_the_true_reward_of_the_starting_policy(tmp_path):
    from preftune.experiments.common import Lab, one_thread
    from preftune.experiments.synthetic import true_reward

    class TrueReward:
        name = "true reward"

        def __call__(self, prompts, completions):
            return true_reward(prompts, completions)

    with one_thread():
        lab = Lab(tmp_path / "lab", seed=0, quick=False)
        start = lab.sft(SentimentTask(), steps=30)
        config = lab.config(
            "online",
            {
                "train.learning_rate": 1e-3,
                "train.max_steps": 6,
                "online.rounds": 2,
                "rollout.max_new_tokens": 12,
            },
        )
        result = train_online(
            config,
            model=start,
            tokenizer=lab.tokenizer,
            prompts=[{"prompt": p} for p in SentimentTask().prompts(64, 1)],
            scorer=TrueReward(),
        )
    before, after = result.rounds[0]["reward_mean"], result.final["reward_mean"]
    assert after > before + 0.2, (before, after)


def test_the_command_line_trains_from_a_folder_with_a_reward_function_and_refuses_a_second_run(
    tmp_path, tokenizer, capsys
):
    from preftune.cli import main

    tiny_llama(len(tokenizer), seed=1).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sentiment_prompts(4)))
    (tmp_path / "rewards.py").write_text(
        "def words(prompts, completions):\n    return [len(c.split()) for c in completions]\n"
    )
    argv = ["online", "--model", str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--reward", f"{tmp_path / 'rewards.py'}:words", "--rounds", "1", "--samples-per-prompt", "3",
            "--output", str(tmp_path / "out"), "--set", "rollout.max_new_tokens=5", "--set", "train.max_steps=1",
            "--set", "train.report_to=none", "--set", "train.progress=false"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
    assert "round 1/1" in capsys.readouterr().out
    assert main(argv) == 2
    assert "holds an earlier online run; use --resume" in capsys.readouterr().err


def first_step(tmp_path, round_index):
    path = tmp_path / "online" / f"round-0{round_index}" / "train" / "metrics.jsonl"
    return json.loads(path.read_text().splitlines()[0])


def test_each_round_is_measured_against_its_starting_policy_by_default_or_the_initial_model(
    tmp_path, tokenizer
):
    # Before its first update a policy equals its reference: the step-1 rewards are exactly 0.
    run_online(tmp_path / "round", tokenizer, "online.final_samples=false")
    assert first_step(tmp_path / "round", 2)["rewards/chosen"] == 0.0
    run_online(tmp_path / "initial", tokenizer, "online.final_samples=false", "online.reference=initial")
    assert first_step(tmp_path / "initial", 1)["rewards/chosen"] == 0.0
    assert first_step(tmp_path / "initial", 2)["rewards/chosen"] != 0.0


def test_chat_prompts_are_rendered_with_the_template_and_scored_as_messages(tmp_path, tokenizer):
    seen = {}

    class Recorder:
        name = "recorder"

        def __call__(self, prompts, completions):
            seen.update(prompt=prompts[0], completion=completions[0])
            return [float(len(c[0]["content"])) for c in completions]

    messages = [{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in sentiment_prompts(4)]
    train_online(
        online_config(tmp_path, "online.rounds=1", "online.final_samples=false"),
        model=tiny_llama(len(tokenizer)),
        tokenizer=tokenizer,
        prompts=messages,
        scorer=Recorder(),
    )
    assert seen["prompt"] == messages[0]["prompt"]
    assert seen["completion"][0]["role"] == "assistant"
    first = json.loads((tmp_path / "online" / "round-01" / "pairs.jsonl").read_text().splitlines()[0])
    assert first["prompt"] in [m["prompt"] for m in messages]
    assert first["chosen"][0]["role"] == "assistant"


def test_resuming_with_other_sampling_settings_is_refused_naming_the_saved_samples(tmp_path, tokenizer):
    run_online(tmp_path, tokenizer, "train.save_every=1", stop_in_round=(1, 1))
    with pytest.raises(
        ConfigError, match=r"samples.jsonl: holds 32 samples, but this run draws 8 prompts x 3"
    ):
        run_online(tmp_path, tokenizer, "train.resume=true", "online.samples_per_prompt=3")
