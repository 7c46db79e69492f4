"""`preftune pipeline run`: stages in order, chained by ${stage.final}, skipped, rerun, resumed."""

import json
import os
import signal

import pytest
import yaml
from helpers import sentiment_records

from preftune.cli import main
from preftune.errors import ConfigError
from preftune.experiments.synthetic import build_tokenizer, tiny_llama
from preftune.recipes.pipeline import load_pipeline, run_pipeline

FAST = {"max_steps": 2, "batch_size": 4, "progress": False, "report_to": ["none"], "mixed_precision": "no",
        "learning_rate": 1e-3, "log_every": 1}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    (folder / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(16, seed=4)))
    return folder


def _pipeline(tmp_path, inputs, stages, name="pipeline.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}, sort_keys=False))
    return path


def _stages(inputs, dpo_train=None):
    data = {"path": str(inputs / "prefs.jsonl")}
    return {
        "rm": {"kind": "rm", "model": {"name_or_path": str(inputs / "base")}, "data": data, "train": FAST},
        "dpo": {"model": {"name_or_path": str(inputs / "base")}, "data": data, "train": dpo_train or FAST},
        "more": {"kind": "simpo", "model": {"name_or_path": "${dpo.final}"}, "data": data, "train": FAST},
    }


def test_stages_run_in_order_each_in_its_folder_and_a_reference_gets_the_earlier_final(
    tmp_path, inputs, capsys
):
    result = run_pipeline(_pipeline(tmp_path, inputs, _stages(inputs)))
    assert [row["status"] for row in result["stages"]] == ["ran", "ran", "ran"]
    out = tmp_path / "out"
    config = json.loads((out / "more" / "config.json").read_text())
    assert config["model"]["name_or_path"] == str(out / "dpo" / "final")
    assert config["objective"]["loss"] == ["simpo"]
    assert json.loads((out / "summary.json").read_text())["stages"][0]["stage"] == "rm"
    assert "headline metric" in capsys.readouterr().out


def test_a_kto_stage_trains_on_the_pairs_unpaired_and_reports_its_own_headline(tmp_path, inputs):
    """A stage named after an objective trains with it; KTO logs no reward accuracy, so its
    summary names the margin it did log rather than another figure under that name."""
    stage = {"model": {"name_or_path": str(inputs / "base")}, "data": {"path": str(inputs / "prefs.jsonl")}}
    result = run_pipeline(_pipeline(tmp_path, inputs, {"kto": {**stage, "train": FAST}}))
    (row,) = result["stages"]
    assert row["status"] == "ran" and "rewards/accuracies" not in row
    metrics = [
        json.loads(line) for line in (tmp_path / "out" / "kto" / "metrics.jsonl").read_text().splitlines()
    ]
    assert row["rewards/margins"] == metrics[-1]["rewards/margins"]
    assert "kl" in metrics[-1]


def test_a_complete_stage_is_skipped_and_a_changed_one_reruns_with_what_follows(tmp_path, inputs):
    run_pipeline(_pipeline(tmp_path, inputs, _stages(inputs)))
    again = run_pipeline(_pipeline(tmp_path, inputs, _stages(inputs)))
    assert [row["status"] for row in again["stages"]] == ["skipped", "skipped", "skipped"]
    changed = run_pipeline(_pipeline(tmp_path, inputs, _stages(inputs, {**FAST, "learning_rate": 2e-3})))
    assert [row["status"] for row in changed["stages"]] == [
        "skipped",
        "ran",
        "ran",
    ]  # `more` reads dpo's final


def test_only_and_from_select_stages_and_run_them_again_even_when_complete(tmp_path, inputs):
    path = _pipeline(tmp_path, inputs, _stages(inputs))
    assert [r["status"] for r in run_pipeline(path, only="rm")["stages"]] == ["ran", "not run", "not run"]
    assert [r["status"] for r in run_pipeline(path, start="dpo")["stages"]] == ["skipped", "ran", "ran"]
    assert [r["status"] for r in run_pipeline(path, start="dpo")["stages"]] == ["skipped", "ran", "ran"]
    assert [r["status"] for r in run_pipeline(path, only="rm")["stages"]] == ["ran", "skipped", "skipped"]


def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path, inputs, monkeypatch, capsys):
    import preftune.recipes.dpo as pairwise

    build = pairwise.build_objective
    calls = []

    def interrupting(cfg):
        objective = build(cfg)

        class Once:
            def __getattr__(self, name):
                return getattr(objective, name)

            def __call__(self, stats):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return objective(stats)

        return Once()

    stages = _stages(inputs, {**FAST, "max_steps": 4, "save_every": 10})
    path = _pipeline(tmp_path, inputs, {"dpo": stages["dpo"]})
    monkeypatch.setattr(pairwise, "build_objective", interrupting)
    assert main(["pipeline", "run", str(path)]) == 143
    said = capsys.readouterr().err.strip().splitlines()[-1]  # what to do, in a pipeline's terms
    assert said.startswith("preftune: stage dpo: stopped by SIGTERM after step 2; saved ")
    assert f"run `preftune pipeline run {path}` again" in said and "--resume" not in said
    assert json.loads((tmp_path / "out" / "dpo" / "stage.json").read_text())["status"] == "running"
    monkeypatch.setattr(pairwise, "build_objective", build)
    result = run_pipeline(path)
    assert result["stages"][0]["status"] == "resumed"
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "out" / "dpo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_a_reference_to_a_later_or_unknown_stage_is_refused_naming_stage_and_key(tmp_path, inputs):
    stages = _stages(inputs)
    stages["dpo"]["model"]["name_or_path"] = "${more.final}"
    with pytest.raises(
        ConfigError, match=r"stages.dpo.model.name_or_path: \$\{more.…\} names no earlier stage"
    ):
        load_pipeline(_pipeline(tmp_path, inputs, stages))


def test_a_stage_of_an_unknown_kind_is_refused_before_anything_runs(tmp_path, inputs):
    stages = {**_stages(inputs), "late": {"kind": "magic"}}
    with pytest.raises(ConfigError, match="unknown 'magic'"):
        run_pipeline(_pipeline(tmp_path, inputs, stages))
    assert not (tmp_path / "out").exists()


def test_a_ppo_stage_trains_the_policy_an_earlier_stage_saved_with_that_stages_reward_model(tmp_path, inputs):
    stages = _stages(inputs)
    ppo = {
        "model": {"name_or_path": "${dpo.final}"},
        "prompts": {"path": str(inputs / "prefs.jsonl")},
        "reward": {"scorer": "${rm.final}"},
        "ppo": {
            "steps": 2,
            "rollouts_per_step": 4,
        },
        "rollout": {"max_new_tokens": 4},
        "train": {key: value for key, value in FAST.items() if key != "max_steps"},
    }
    result = run_pipeline(_pipeline(tmp_path, inputs, {"rm": stages["rm"], "dpo": stages["dpo"], "ppo": ppo}))
    assert [row["status"] for row in result["stages"]] == ["ran", "ran", "ran"]
    assert "objective/scores" in result["stages"][2]
    assert (tmp_path / "out" / "ppo" / "final" / "model.safetensors").exists()
    assert (tmp_path / "out" / "ppo" / "checkpoint-2" / "value" / "model.safetensors").exists()


def test_an_eval_stage_scores_an_earlier_stages_policy_against_its_reference(tmp_path, inputs):
    stages = _stages(inputs)
    stages = {"dpo": stages["dpo"], "eval": {
        "policy": "${dpo.final}", "reference": str(inputs / "base"), "reward": "preftune.experiments.synthetic:true_reward",
        "sets": {"id": str(inputs / "prefs.jsonl")},
    }}  # fmt: skip
    result = run_pipeline(_pipeline(tmp_path, inputs, stages))
    assert [row["status"] for row in result["stages"]] == ["ran", "ran"]
    report = json.loads((tmp_path / "out" / "eval" / "eval.json").read_text())
    assert report["policy"] == str(tmp_path / "out" / "dpo" / "final")
    assert (
        0 <= report["sets"]["id"]["dpo_rm_accuracy"] <= 1
        and report["sets"]["id"]["ex_rm_accuracy"] is not None
    )


def test_an_eval_stage_without_sets_is_refused_before_anything_runs(tmp_path, inputs):
    stages = {"dpo": _stages(inputs)["dpo"], "eval": {"policy": "${dpo.final}"}}
    with pytest.raises(ConfigError, match=r"stages.eval: an eval stage needs 'policy' and 'sets'"):
        run_pipeline(_pipeline(tmp_path, inputs, stages))
    assert not (tmp_path / "out").exists()


def test_an_online_stage_samples_the_earlier_policy_scores_with_the_earlier_reward_model(tmp_path, inputs):
    stages = _stages(inputs)
    sampling = {
        "prompts": {"path": str(inputs / "prefs.jsonl"), "limit": 4},
        "reward": {"scorer": "${rm.final}"},
    }
    stages = {"rm": stages["rm"], "dpo": stages["dpo"], "online": {
        "model": {"name_or_path": "${dpo.final}"}, **sampling, "online": {"rounds": 1}, "rollout": {"max_new_tokens": 4}, "train": FAST,
    }}  # fmt: skip
    result = run_pipeline(_pipeline(tmp_path, inputs, stages))
    assert [row["status"] for row in result["stages"]] == ["ran", "ran", "ran"]
    out = tmp_path / "out" / "online"
    config = json.loads((out / "config.json").read_text())
    assert config["reward"]["scorer"] == str(tmp_path / "out" / "rm" / "final")
    assert config["model"]["name_or_path"] == str(tmp_path / "out" / "dpo" / "final")
    assert (out / "final" / "model.safetensors").exists() and (out / "round-01" / "pairs.jsonl").exists()
    assert isinstance(result["stages"][2]["reward_mean"], float)


def test_an_online_stage_without_a_reward_is_refused_before_anything_runs(tmp_path, inputs):
    stages = {"online": {"model": {"name_or_path": str(inputs / "base")}, "prompts": {"path": "p.jsonl"}}}
    with pytest.raises(ConfigError, match=r"stages.online.reward.scorer: an online stage needs"):
        run_pipeline(_pipeline(tmp_path, inputs, stages))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["pipeline.yaml", "qwen-0.5b-pipeline.yaml"])
def test_the_example_pipelines_load_and_every_stage_is_a_valid_config_of_its_command(name):
    from pathlib import Path

    from preftune.recipes.pipeline import check_stages

    path = Path(__file__).parent.parent / "examples" / name
    output, stages = load_pipeline(path)
    assert {"sft", "rm", "dpo", "online"} <= {stage.kind for stage in stages}
    # an unknown key, a key the stage's command does not read, or a bad value raises, naming it
    check_stages(path, stages, {stage.name: output / stage.name for stage in stages})
