"""Reward-model ensembles: the aggregates, the folder every kind saves, how it scores, its training
and resume, and ``rm score``'s report of its members."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import quiet_config, sentiment_records
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import load_config
from preftune.data.layouts import collate_pairs
from preftune.errors import ConfigError, ModelLoadError, ScorerError
from preftune.evaluation.samples import best_of_n, expected_best_of_n
from preftune.experiments.common import one_thread
from preftune.experiments.synthetic import tiny_reward_model
from preftune.generation.aggregate import Scores, aggregate_row, aggregate_rows
from preftune.generation.ensemble import EnsembleScorer, read_manifest
from preftune.generation.rewards import load_scorer
from preftune.generation.scoring import FunctionScorer, RewardModelScorer
from preftune.recipes.reward import train_reward_model
from preftune.recipes.reward_ensemble import bootstrap_weights, ensemble_loss, resample

RECORDS = sentiment_records(24, seed=3)
HELD_OUT = sentiment_records(16, seed=4)
TEXTS = (["review of the park:"] * 3, [" great calm", " awful dull stale", " kind"])

# --------------------------------------------------------------------------- the aggregates


def test_the_mean_of_members_1_and_3_is_2():
    assert aggregate_row([1.0, 3.0], "mean") == 2.0


def test_the_worst_case_of_members_1_and_3_is_1():
    assert aggregate_row([1.0, 3.0], "min") == 1.0


def test_mean_minus_std_subtracts_lambda_population_standard_deviations():
    """[1, 3]: mean 2, std 1 (population: divided by K), λ = 0.5 -> 1.5. [0, 0, 3]: mean 1,
    std √((1 + 1 + 4)/3) = √2, λ = 0.5 -> 1 − 0.707107 = 0.292893."""
    assert aggregate_row([1.0, 3.0], "mean_minus_std", 0.5) == pytest.approx(1.5)
    assert aggregate_row([0.0, 0.0, 3.0], "mean_minus_std", 0.5) == pytest.approx(0.292893, abs=1e-6)


def test_a_completion_any_member_leaves_unscored_is_unscored_by_every_aggregate():
    for how in ("mean", "min", "mean_minus_std"):
        assert math.isnan(aggregate_row([1.0, math.nan], how))


def test_disagreement_is_the_members_standard_deviation_averaged_over_completions():
    """Rows [1, 3] (std 1) and [2, 2] (std 0): 0.5; member means 1.5 and 2.5."""
    scores = aggregate_rows([[1.0, 3.0], [2.0, 2.0]], "mean")
    assert scores.disagreement() == pytest.approx(0.5)
    assert scores.member_means() == [1.5, 2.5]
    assert Scores([1.0, 2.0]).disagreement() is None  # one member: nothing to disagree


# --------------------------------------------------------------------------- functions with columns


def _function(tmp_path, body):
    (tmp_path / "columns.py").write_text(body)
    return f"{tmp_path / 'columns.py'}:fn"


def test_a_function_answering_several_columns_is_aggregated_like_an_ensemble(tmp_path):
    spec = _function(
        tmp_path, "def fn(prompts, completions):\n    return [[len(c), -len(c)] for c in completions]\n"
    )
    scorer = FunctionScorer(spec, aggregate="min")
    detail = scorer.detail(*TEXTS)
    assert detail.members == [[11.0, -11.0], [17.0, -17.0], [5.0, -5.0]]
    assert scorer(*TEXTS) == [-11.0, -17.0, -5.0]
    assert load_scorer(spec, aggregate="mean")(*TEXTS) == [0.0, 0.0, 0.0]


def test_a_function_whose_rows_differ_in_length_is_refused_naming_it(tmp_path):
    spec = _function(
        tmp_path,
        "def fn(prompts, completions):\n    return [[1.0, 2.0]] + [[1.0]] * (len(completions) - 1)\n",
    )
    with pytest.raises(ScorerError, match=r"columns.py:fn answered rows of different lengths \(\[1, 2\]\)"):
        FunctionScorer(spec)(*TEXTS)


# --------------------------------------------------------------------------- the heads' loss


class FixedRewards(torch.nn.Module):
    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def forward(self, batch):
        return self.rewards


def test_the_heads_loss_is_the_mean_over_heads_of_each_heads_bootstrap_weighted_loss(tokenizer):
    """Chosen (1.0, 0.0), rejected (0.2, 0.5), the pair drawn twice by head 0 and once by head 1:
    (2 · −log σ(0.8) + 1 · −log σ(−0.5)) / 2 = (2 · 0.371101 + 0.974077) / 2 = 0.858140."""
    from preftune.config import DataConfig
    from preftune.data import prepare_pairs

    pairs, _ = prepare_pairs(RECORDS[:1], tokenizer, DataConfig(), progress=False)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    weights = torch.ones(1, 2)
    weights[0] = torch.tensor([2.0, 1.0])
    losses, metrics = ensemble_loss(None, weights)(FixedRewards([[1.0, 0.0], [0.2, 0.5]]), batch)
    assert losses.item() == pytest.approx(0.858140, abs=1e-6)
    assert metrics["accuracy"].item() == 0.5  # head 0 right, head 1 wrong
    assert metrics["ensemble_accuracy"].item() == 1.0  # means 0.5 against 0.35


def test_each_member_draws_its_own_bootstrap_resample_of_as_many_pairs(tokenizer):
    from preftune.config import DataConfig
    from preftune.data import prepare_pairs

    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    table = bootstrap_weights(pairs, [], 3, seed=7, bootstrap=True)
    assert table.sum(dim=0).tolist() == [len(pairs)] * 3  # each member draws N of the N pairs
    assert not torch.equal(table[:, 0], table[:, 1])
    assert (table == 0).any()  # some pairs left out, as a bootstrap leaves about 1/e of them
    assert torch.equal(bootstrap_weights(pairs, [], 3, 7, bootstrap=False), torch.ones(len(pairs), 3))
    assert resample(pairs, 5) == resample(pairs, 5) != resample(pairs, 6)


# --------------------------------------------------------------------------- the three kinds


def ensemble_config(output, kind, *overrides):
    return quiet_config(
        str(output), "train.batch_size=8", "train.max_steps=2", "rm.ensemble=2", f"rm.ensemble_kind={kind}",
        "train.learning_rate=5e-3", *overrides,
    )  # fmt: skip


def train_ensemble(output, kind, tokenizer, *overrides, stop_after=None):
    with one_thread():
        return train_reward_model(
            ensemble_config(output, kind, *overrides),
            model=tiny_reward_model(len(tokenizer), seed=0),
            tokenizer=tokenizer,
            train_data=RECORDS,
            eval_data=HELD_OUT,
            stop_after=stop_after,
        )


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory, tokenizer):
    """An ensemble of two of each kind, trained for two steps."""
    root = tmp_path_factory.mktemp("ensembles")
    return {
        kind: train_ensemble(root / kind, kind, tokenizer).final_dir for kind in ("full", "heads", "lora")
    }


def _alone(kind, folder, k, tokenizer):
    """Member k's rewards as a model of its own: its folder (full), the backbone with head row k
    (heads), the base with only adapter k (lora)."""
    if kind == "full":
        return RewardModelScorer(str(folder / f"member-{k:02d}"), device="cpu")(*TEXTS)
    if kind == "heads":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(folder)
        head = torch.nn.Linear(model.score.in_features, 1, bias=False)
        head.weight.data = model.score.weight.data[k : k + 1].clone()
        model.score, model.config.num_labels = head, 1
        model.save_pretrained(folder.parent / f"head-{k}")
        tokenizer.save_pretrained(folder.parent / f"head-{k}")
        return RewardModelScorer(str(folder.parent / f"head-{k}"), device="cpu")(*TEXTS)
    from peft import PeftModel

    scorer = RewardModelScorer(str(folder / "base"), device="cpu")
    scorer.model = PeftModel.from_pretrained(scorer.model, str(folder / f"member-{k:02d}")).eval()
    return scorer(*TEXTS)


@pytest.mark.parametrize("kind", ["full", "heads", "lora"])
def test_an_ensemble_folder_gives_each_member_the_rewards_that_member_gives_alone(ensembles, kind, tokenizer):
    folder = ensembles[kind]
    assert read_manifest(folder)["kind"] == kind
    scorer = EnsembleScorer(str(folder), device="cpu")
    columns = scorer.columns(*TEXTS)
    for k in range(2):
        assert [row[k] for row in columns] == pytest.approx(_alone(kind, folder, k, tokenizer), abs=1e-5)
    assert columns[0][0] != pytest.approx(columns[0][1], abs=1e-4)  # new heads: the members differ


@pytest.mark.parametrize("kind", ["full", "heads", "lora"])
def test_load_scorer_takes_an_ensemble_folder_and_answers_its_aggregate(ensembles, kind):
    columns = EnsembleScorer(str(ensembles[kind]), device="cpu").columns(*TEXTS)
    scorer = load_scorer(str(ensembles[kind]), aggregate="min", device="cpu")
    assert scorer(*TEXTS) == pytest.approx([min(row) for row in columns])


REWARDS = [0.5, -1.0, 2.0]
"""What the hand-built reward model ``r`` answers for ``TEXTS``."""


def _head_for(model, tokenizer, folder, targets):
    """A head for ``model`` that answers ``targets`` for ``TEXTS``: the reward is linear in the head,
    so three random heads' answers (a 3×3 matrix) say which mix of them answers the targets."""
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randn(model.score.weight.shape, generator=generator) for _ in range(3)]
    answers = []
    for k, probe in enumerate(probes):
        model.score.weight.data = probe
        model.save_pretrained(folder / f"probe-{k}")
        tokenizer.save_pretrained(folder / f"probe-{k}")
        answers.append(RewardModelScorer(str(folder / f"probe-{k}"), device="cpu")(*TEXTS))
    mix = torch.linalg.solve(
        torch.tensor(answers, dtype=torch.float64).T, torch.tensor(targets, dtype=torch.float64)
    )
    return sum(float(c) * probe for c, probe in zip(mix, probes, strict=True))


def _scaled_heads(tmp_path, tokenizer, kind):
    """A hand-built ensemble of three members from one reward model ``r`` (answering ``REWARDS``):
    its head times 1, 2 and −1, so that the members answer ``r``, ``2r`` and ``−r``."""
    from preftune.generation.ensemble import write_manifest

    model = tiny_reward_model(len(tokenizer), seed=5)
    head, scales = _head_for(model, tokenizer, tmp_path, REWARDS), (1.0, 2.0, -1.0)
    folder = tmp_path / kind
    if kind == "full":
        for k, scale in enumerate(scales):
            model.score.weight.data = scale * head
            model.save_pretrained(folder / f"member-{k:02d}")
            tokenizer.save_pretrained(folder / f"member-{k:02d}")
    else:
        model.score = torch.nn.Linear(head.shape[1], 3, bias=False)
        model.score.weight.data = torch.cat([scale * head for scale in scales])
        model.config.num_labels = 3
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    write_manifest(folder, kind, [f"member-{k:02d}" for k in range(3)])
    return folder


@pytest.mark.parametrize("kind", ["full", "heads"])
def test_an_ensemble_of_r_2r_and_minus_r_scores_each_aggregate_as_worked_by_hand(tmp_path, tokenizer, kind):
    """r = (0.5, −1, 2) on the three texts; members r, 2r, −r:
    mean 2r/3 = (0.333333, −0.666667, 1.333333); min (−0.5, −2, −2);
    population std |r|·√((1/9 + 16/9 + 25/9)/3) = |r|·√14/3 = (0.623610, 1.247219, 2.494438), so
    mean − 0.5·std = (0.021529, −1.290276, 0.086114); disagreement, the mean std: 1.455089."""
    folder = _scaled_heads(tmp_path, tokenizer, kind)
    columns = EnsembleScorer(str(folder), device="cpu").columns(*TEXTS)
    assert columns == [pytest.approx([0.5, 1.0, -0.5], abs=1e-4), pytest.approx([-1.0, -2.0, 1.0], abs=1e-4),
                       pytest.approx([2.0, 4.0, -2.0], abs=1e-4)]  # fmt: skip
    worked = {
        "mean": [0.333333, -0.666667, 1.333333],
        "min": [-0.5, -2.0, -2.0],
        "mean_minus_std": [0.021529, -1.290276, 0.086114],
    }
    for how, expected in worked.items():
        scorer = load_scorer(str(folder), aggregate=how, uncertainty_penalty=0.5, device="cpu")
        assert scorer(*TEXTS) == pytest.approx(expected, abs=1e-4), how
        assert scorer.detail(*TEXTS).disagreement() == pytest.approx(1.455089, abs=1e-4)


def test_training_reports_each_member_and_each_aggregates_accuracy_on_the_eval_pairs(ensembles):
    card = (ensembles["full"] / "README.md").read_text()
    assert "ensemble of 2 (full)" in card
    members = [ensembles["full"].parent / f"member-{k:02d}" / "metrics.jsonl" for k in range(2)]
    assert all(path.exists() for path in members)  # each member a run of its own


def test_a_broken_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "ensemble.json").write_text(
        json.dumps({"kind": "full", "members": ["member-00", "member-01"]})
    )
    with pytest.raises(ModelLoadError, match=r"member folder .*member-00 is missing"):
        load_scorer(str(tmp_path))
    (tmp_path / "ensemble.json").write_text(json.dumps({"kind": "mixture", "members": ["a", "b"]}))
    with pytest.raises(ModelLoadError, match="kind must be one of full, heads, lora"):
        load_scorer(str(tmp_path))


@pytest.mark.parametrize(("kind", "stop_after"), [("full", 3), ("heads", 1), ("lora", 3)])
def test_resuming_an_interrupted_ensemble_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path, tokenizer, kind, stop_after
):
    """Members of 2 steps: full and lora stop after member 0 and one step of member 1; heads after
    its first step."""
    settings = ("train.save_every=1",)
    straight = train_ensemble(tmp_path / "a", kind, tokenizer, *settings)
    stopped = train_ensemble(tmp_path / "b", kind, tokenizer, *settings, stop_after=stop_after)
    assert stopped.final_dir is None
    resumed = train_ensemble(tmp_path / "b", kind, tokenizer, *settings, "train.resume=true")
    files = sorted(p.relative_to(straight.final_dir) for p in straight.final_dir.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(resumed.final_dir) for p in resumed.final_dir.rglob("*.safetensors"))
    for name in files:
        a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
        assert all(torch.equal(a[key], b[key]) for key in a), name
    assert straight.history[-1]["eval_accuracy"] == resumed.history[-1]["eval_accuracy"]


def test_a_second_ensemble_into_the_same_folder_is_refused_without_resume_or_overwrite(ensembles, tokenizer):
    with pytest.raises(ConfigError, match="holds an earlier run"):
        train_ensemble(ensembles["full"].parent, "full", tokenizer)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rm.ensemble=0", "rm.ensemble: must be >= 1"),
        ("rm.ensemble_kind=bagged", "rm.ensemble_kind: 'bagged' is not one of"),
        ("reward.uncertainty_penalty=2", "reward.uncertainty_penalty: is read only with reward.aggregate"),
        ("reward.aggregate=median", "reward.aggregate: 'median' is not one of"),
    ],
)
def test_bad_ensemble_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


# --------------------------------------------------------------------------- rm score and best-of-n


def test_rm_score_reports_each_members_accuracy_and_the_ensembles(ensembles, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT))
    out = tmp_path / "scores.jsonl"
    argv = ["rm", "score", "--model", str(ensembles["heads"]), "--data", str(data), "--output", str(out)]
    assert main([*argv, "--aggregate", "min"]) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    member_right = [
        sum(r["chosen_member_scores"][k] > r["rejected_member_scores"][k] for r in lines) for k in (0, 1)
    ]
    assert f"of {len(HELD_OUT)} pairs (min of 2 members)" in printed
    for k in (0, 1):
        assert f"member {k}" in printed and f"{member_right[k] / len(HELD_OUT):.1%}" in printed
    assert all(r["chosen_score"] == min(r["chosen_member_scores"]) for r in lines)
    assert "members' disagreement" in printed


def test_expected_best_of_n_selects_by_one_reward_and_measures_another():
    """Pool select (3, 1, 2), measure (30, 10, 20), n = 2: the subsets {0,1}, {0,2}, {1,2} select
    30, 30 and 20: 80/3."""
    assert expected_best_of_n([3.0, 1.0, 2.0], [30.0, 10.0, 20.0], 2) == pytest.approx(80 / 3)
    assert expected_best_of_n([3.0, 1.0, 2.0], [30.0, 10.0, 20.0], 1) == pytest.approx(20.0)


def test_best_of_n_selects_by_an_ensembles_aggregate(ensembles):
    prompts, pool = TEXTS[0][:1], [TEXTS[1]]
    scorer = EnsembleScorer(str(ensembles["full"]), aggregate="min", device="cpu")
    points = best_of_n(scorer, prompts, pool, [1, 3], measure=_Words())
    by_min = scorer(prompts * 3, list(TEXTS[1]))
    best = max(range(3), key=lambda i: by_min[i])
    assert points[1]["reward"] == pytest.approx(by_min[best])
    assert points[1]["measured"] == len(TEXTS[1][best].split())
    assert points[0]["kl"] == 0.0 and points[1]["kl"] == pytest.approx(math.log(3) - 2 / 3)


class _Words:
    name = "words"

    def __call__(self, prompts, completions):
        return [float(len(c.split())) for c in completions]


# --------------------------------------------------------------------------- every place that takes a reward


@pytest.fixture(scope="module")
def policy_files(tmp_path_factory, tokenizer):
    """A tiny policy folder and a prompts file, for the commands."""
    from preftune.experiments.synthetic import SentimentTask, tiny_llama

    root = tmp_path_factory.mktemp("policy")
    tiny_llama(len(tokenizer), seed=1).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SentimentTask().prompts(8, 0)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in HELD_OUT[:6]))
    return root / "base", prompts, pairs


QUIET = [
    "--set",
    "train.report_to=none",
    "--set",
    "train.progress=false",
    "--set",
    "rollout.max_new_tokens=5",
]


@pytest.mark.parametrize("kind", ["full", "heads"])
def test_online_dpo_takes_an_ensemble_folder_and_logs_its_members_disagreement(
    ensembles, policy_files, tmp_path, kind
):
    model, prompts, _ = policy_files
    argv = ["online", "--model", str(model), "--prompts", str(prompts), "--reward", str(ensembles[kind]),
            "--monitor-reward", "preftune.experiments.synthetic:true_reward", "--rounds", "1",
            "--samples-per-prompt", "3", "--output", str(tmp_path / "out"), "--set", "train.max_steps=1",
            "--set", "reward.aggregate=min", *QUIET]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    row = json.loads((tmp_path / "out" / "rounds.jsonl").read_text().splitlines()[0])
    samples = [
        json.loads(line)
        for line in (tmp_path / "out" / "round-01" / "samples.jsonl").read_text().splitlines()
    ]
    assert all(s["score"] == pytest.approx(min(s["member_scores"])) for s in samples)
    assert row["reward_disagreement"] > 0 and len(row["reward_members"]) == 2
    assert row["monitor_mean"] == pytest.approx(sum(s["monitor"] for s in samples) / len(samples))


def test_ppo_takes_an_ensemble_folder_and_logs_its_members_disagreement_each_step(
    ensembles, policy_files, tmp_path, capsys
):
    model, prompts, _ = policy_files
    argv = ["ppo", "--model", str(model), "--prompts", str(prompts), "--reward", str(ensembles["lora"]),
            "--monitor-reward", "preftune.experiments.synthetic:true_reward", "--steps", "2",
            "--output", str(tmp_path / "out"), "--set", "ppo.rollouts_per_step=4", "--set", "train.batch_size=4",
            "--set", "train.log_every=1", "--set", "reward.aggregate=mean_minus_std",
            "--set", "reward.uncertainty_penalty=0.5", "--set", "train.report_to=none",
            "--set", "rollout.max_new_tokens=5"]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["objective/scores_disagreement"] > 0 and "objective/monitor_scores" in row for row in rows)
    # Not a terminal: a line per logged step, the members' disagreement and the monitor beside the score.
    line = next(text for text in capsys.readouterr().out.splitlines() if text.startswith("step 2/2 "))
    std, monitor = rows[1]["objective/scores_disagreement"], rows[1]["objective/monitor_scores"]
    assert (
        f"objective/scores_disagreement {std:.4g} objective/monitor_scores {monitor:.4g} objective/kl "
        in line
    )


def test_ppo_values_with_the_policys_backbone_on_an_ensemble_and_refuses_to_copy_it_as_the_critic(
    ensembles, tokenizer
):
    from preftune.experiments.synthetic import tiny_llama
    from preftune.recipes.ppo_experience import build_critic

    scorer, policy = EnsembleScorer(str(ensembles["full"]), device="cpu"), tiny_llama(len(tokenizer), seed=1)
    _, source = build_critic(load_config(), policy, scorer, tokenizer, print)
    assert source.startswith("the policy's backbone")  # auto: no one reward model to start from
    with pytest.raises(
        ConfigError, match=r"is an ensemble of 2, no one model to copy: use ppo\.value_model=policy"
    ):
        build_critic(load_config(overrides=["ppo.value_model=reward"]), policy, scorer, tokenizer, print)


def test_eval_takes_an_ensemble_folder_as_its_reward_model_and_reports_each_member(
    ensembles, policy_files, tmp_path, capsys
):
    model, _, pairs = policy_files
    argv = ["eval", "--policy", str(model), "--reward-model", str(ensembles["full"]), "--data", f"id={pairs}",
            "--output", str(tmp_path / "eval"), "--aggregate", "min"]  # fmt: skip
    with one_thread():
        assert main(argv) == 0
    assert "EX-RM accuracy, weakest member" in capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())["sets"]["id"]
    members = EnsembleScorer(str(ensembles["full"]), device="cpu")
    texts = [(r["prompt"], r["chosen"], r["rejected"]) for r in HELD_OUT[:6]]
    chosen = members.columns([t[0] for t in texts], [t[1] for t in texts])
    rejected = members.columns([t[0] for t in texts], [t[2] for t in texts])
    expected = [sum(c[k] > r[k] for c, r in zip(chosen, rejected, strict=True)) / 6 for k in (0, 1)]
    assert report["ex_rm_member_accuracy"] == pytest.approx(expected)
    by_min = sum(min(c) > min(r) for c, r in zip(chosen, rejected, strict=True)) / 6
    assert report["ex_rm_accuracy"] == pytest.approx(by_min)


def test_a_ppo_run_on_an_ensemble_resumes_exactly_monitor_included(ensembles, tokenizer, tmp_path):
    from preftune.experiments.synthetic import SentimentTask, tiny_llama, true_reward
    from preftune.recipes.ppo import train_ppo

    class Gold:
        name = "true reward"

        def __call__(self, prompts, completions):
            return true_reward(list(prompts), list(completions))

    def run(folder, *overrides, stop_after=None):
        config = quiet_config(
            str(folder), "train.batch_size=4", "ppo.steps=3", "ppo.rollouts_per_step=4", "ppo.ppo_epochs=1",
            "rollout.max_new_tokens=5", "train.save_every=1", f"reward.scorer={ensembles['heads']}",
            "reward.aggregate=min", *overrides,
        )  # fmt: skip
        with one_thread():
            return train_ppo(config, model=tiny_llama(len(tokenizer), seed=0), tokenizer=tokenizer,
                             prompts=[{"prompt": p} for p in SentimentTask().prompts(8, 0)], monitor=Gold(),
                             stop_after=stop_after)  # fmt: skip

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    resumed = run(tmp_path / "b", "train.resume=true")
    a, b = (load_file(tmp_path / run_dir / "final" / "model.safetensors") for run_dir in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    timeless = [{k: v for k, v in row.items() if "per_second" not in k} for row in resumed.history]
    assert timeless == [
        {k: v for k, v in row.items() if "per_second" not in k} for row in straight.history[2:]
    ]
    assert "objective/scores_disagreement" in timeless[0] and "monitor/best_step" in timeless[0]


def test_an_online_dpo_run_on_an_ensemble_resumes_exactly_monitor_included(ensembles, tokenizer, tmp_path):
    """Stopped in round 2 after one step and resumed: the same rounds (rewards, members'
    disagreement, monitor) and the same final policy as the run never stopped."""
    from preftune.experiments.synthetic import SentimentTask, tiny_llama, true_reward
    from preftune.recipes.online import train_online

    class Gold:
        name = "true reward"

        def __call__(self, prompts, completions):
            return true_reward(list(prompts), list(completions))

    def run(folder, *overrides, stop_in_round=None):
        config = quiet_config(
            str(folder), "train.batch_size=4", "online.rounds=2", "online.samples_per_prompt=3",
            "rollout.max_new_tokens=5", "train.save_every=1", f"reward.scorer={ensembles['full']}",
            "reward.aggregate=mean_minus_std", "reward.uncertainty_penalty=0.5", *overrides,
        )  # fmt: skip
        with one_thread():
            return train_online(config, model=tiny_llama(len(tokenizer), seed=0), tokenizer=tokenizer,
                                prompts=[{"prompt": p} for p in SentimentTask().prompts(8, 0)], monitor=Gold(),
                                stop_in_round=stop_in_round)  # fmt: skip

    def timeless(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    straight = run(tmp_path / "a")
    assert [row["round"] for row in run(tmp_path / "b", stop_in_round=(2, 1)).rounds] == [1]
    resumed = run(tmp_path / "b", "train.resume=true")
    assert timeless(resumed.rounds) == timeless(straight.rounds)
    assert timeless([resumed.final]) == timeless([straight.final])
    assert resumed.rounds[1]["reward_disagreement"] > 0 and "monitor_mean" in resumed.rounds[1]
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
