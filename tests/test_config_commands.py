"""Each command reads only its own config keys; a key another command reads is refused in one line
that names the key and the commands that read it (a knob silently ignored is a wasted run)."""

from __future__ import annotations

import pytest

from preftune.cli import main
from preftune.config import COMMANDS, SECTIONS, ConfigError, load_config, readers

# For every command, a key of a section it does not read, and who reads it.
FOREIGN = {
    "train": ("ppo.kl_coef", "'preftune ppo'"),
    "sft": ("ppo.kl_coef", "'preftune ppo'"),
    "rm train": ("objective.beta", "'preftune train', 'preftune online', 'preftune check-data'"),
    "online": ("rm.margin_field", "'preftune rm train', 'preftune check-data'"),
    "ppo": ("objective.beta", "'preftune train', 'preftune online', 'preftune check-data'"),
    "eval": (
        "train.learning_rate",
        "'preftune train', 'preftune sft', 'preftune rm train', 'preftune online', 'preftune ppo'",
    ),
    "check-data": ("rollout.temperature", "'preftune online', 'preftune ppo'"),
}


def test_every_command_is_specified_here():
    assert set(FOREIGN) == set(COMMANDS)


def test_every_section_is_read_by_some_command():
    assert {section for sections in COMMANDS.values() for section in sections} == set(SECTIONS)


@pytest.mark.parametrize("command", sorted(FOREIGN))
def test_a_key_the_command_does_not_read_is_refused_naming_who_reads_it(command):
    key, users = FOREIGN[command]
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=[f"{key}=0.3"], command=command)
    assert str(refused.value) == f"{key} is read by {users}, not by 'preftune {command}'"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_key_of_the_commands_sections_is_accepted_at_its_default(command):
    from preftune.config.commands import dotted_keys
    from preftune.config.load import RunConfig, to_dict

    tree = to_dict(RunConfig())
    own = {k: v for k, v in ((key, _get(tree, key)) for key in dotted_keys(tree)) if command in readers(k)}
    load_config(base=own, command=command)  # no refusal


def _get(tree, dotted):
    section, key = dotted.split(".", 1)
    return tree[section][key]


def test_a_data_key_only_some_commands_read_is_refused_by_the_others():
    with pytest.raises(
        ConfigError,
        match=r"^data.messages_field is read by 'preftune sft', 'preftune check-data', not by 'preftune train'$",
    ):
        load_config(overrides=["data.messages_field=conversation"], command="train")


def test_eval_accepts_the_split_it_reads_its_sets_from():
    """``eval`` reads a hub dataset's sets from ``data.split`` (evaluate.load_sets): the key is its."""
    assert load_config(overrides=["data.split=test_prefs"], command="eval").data.split == "test_prefs"


def test_a_section_given_empty_in_a_file_is_not_a_key_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: m}\nppo:\n")
    assert load_config(path, command="sft").model.name_or_path == "m"


def test_without_a_command_every_section_is_accepted():
    config = load_config(overrides=["ppo.kl_coef=0.3", "objective.beta=0.5"])
    assert config.ppo.kl_coef == 0.3 and config.objective.beta == 0.5


def test_the_command_line_refuses_a_foreign_key_before_anything_loads(capsys, tmp_path):
    code = main(["sft", "--model", "nowhere", "--data", "nowhere.jsonl", "--output", str(tmp_path / "o"),
                 "--set", "ppo.kl_coef=0.3", "--set", "objective.beta=0.5"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "preftune: error: ppo.kl_coef is read by 'preftune ppo', not by 'preftune sft'"
    assert not (tmp_path / "o").exists()


def test_a_foreign_key_in_the_config_file_is_refused_too(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl}\nonline: {rounds: 2}\n")
    code = main(["train", "--config", str(path), "--output", str(tmp_path / "o")])
    assert code == 2
    assert "online.rounds is read by 'preftune online', not by 'preftune train'" in capsys.readouterr().err


def test_a_pipeline_stage_refuses_a_key_its_kind_does_not_read(tmp_path):
    from preftune.recipes.pipeline import run_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(
        f"output: {tmp_path / 'out'}\nstages:\n  sft:\n    model: {{name_or_path: m}}\n"
        "    data: {path: d.jsonl}\n    objective: {beta: 0.5}\n"
    )
    with pytest.raises(ConfigError, match=r"objective.beta is read by .*, not by 'preftune sft'"):
        run_pipeline(path)
