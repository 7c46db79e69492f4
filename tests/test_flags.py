"""A flag for every config key a command reads, generated from the config dataclasses: each equals
``--set``, ``--help`` lists only the command's sections, and precedence is defaults < YAML < flags,
the later flag winning among flags whatever its spelling."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

import pytest

from preftune.cli import build_parser, main
from preftune.cli.flags import settings
from preftune.config import COMMANDS, RunConfig, load_config, readers
from preftune.config.coerce import build
from preftune.config.load import config_tree

COMMAND_ARGV = {"train": ["train"], "sft": ["sft"], "rm train": ["rm", "train"], "online": ["online"],
                "ppo": ["ppo"], "eval": ["eval", "--policy", "p", "--data", "id=x.jsonl", "--output", "o"],
                "check-data": ["check-data", "x.jsonl"]}  # fmt: skip
"""Each command as typed, with the arguments it requires."""


def keys_of(command: str) -> list[tuple[str, typing.Any, typing.Any]]:
    """``(section.key, annotation, default)`` of every key ``command`` reads."""
    hints = typing.get_type_hints(RunConfig)
    found = []
    for section in COMMANDS[command]:
        cls = hints[section]
        for item in dataclasses.fields(cls):
            key = f"{section}.{item.name}"
            if command in readers(key) and (command, key) != ("check-data", "data.path"):  # its FILE argument
                default = (
                    item.default_factory()
                    if item.default_factory is not dataclasses.MISSING
                    else item.default
                )
                found.append((key, typing.get_type_hints(cls)[item.name], default))
    return found


def other_value(hint: typing.Any, default: typing.Any) -> str:
    """Text for a value of type ``hint`` other than ``default``, as a user would type it."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    members = tuple(m for m in members if m is not type(None))
    first = members[0]
    if typing.get_origin(first) is typing.Literal:
        return next(str(choice) for choice in typing.get_args(first) if choice != default)
    if first is bool:
        return "false" if default else "true"
    if typing.get_origin(first) is list:
        return "0.5,0.25" if typing.get_args(first)[0] is float else "a,b"
    if first is int:
        return str((default or 0) + 2)
    return {float: "0.25", str: "other"}[first]


def typed(overrides: list) -> RunConfig:
    """The config the overrides give, typed but without the cross-key rules (which need whole runs)."""
    return build(RunConfig, config_tree(None, overrides, None, None, []), "")


@functools.cache
def parser():
    """The command line's parser, built once: parsing leaves nothing behind in it."""
    return build_parser()


def parsed(argv: list[str]) -> list:
    return settings(parser().parse_args(argv))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_keys_flag_equals_set(command):
    for key, hint, default in keys_of(command):
        value = other_value(hint, default)
        by_flag = typed(parsed([*COMMAND_ARGV[command], f"--{key}", value]))
        by_set = typed([f"{key}={value}"])
        assert by_flag == by_set, key
        assert by_flag != RunConfig(), key  # the value reached the config


def test_a_list_flag_takes_several_values_as_trl_does():
    assert typed(parsed(["train", "--objective.loss", "dpo", "sft"])).objective.loss == ["dpo", "sft"]


def test_a_boolean_flag_alone_means_true():
    assert typed(parsed(["train", "--model.lora"])).model.lora is True


def test_a_boolean_flag_takes_a_value():
    assert typed(parsed(["train", "--train.shuffle", "false"])).train.shuffle is False


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_the_sections_and_keys_the_command_reads_and_no_other(command, capsys):
    with pytest.raises(SystemExit):
        main([*COMMAND_ARGV[command], "--help"])
    out = capsys.readouterr().out
    for section in {"model", "data", "objective", "reference", "train", "rm", "prompts", "reward", "rollout",
                    "online", "ppo"}:  # fmt: skip
        assert (f"\n{section} section" in out) == (section in COMMANDS[command]), section
    for key, _, _ in keys_of(command):
        assert f"--{key} " in out, key
    unread = [
        k
        for k in ("data.messages_field", "data.label_field", "data.completion_only_loss")
        if command not in readers(k)
    ]
    for key in unread:
        assert f"--{key} " not in out, key


def test_a_key_flag_the_command_does_not_read_is_not_a_flag_of_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--objective.beta", "0.1"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --objective.beta" in capsys.readouterr().err


def test_a_mistyped_flag_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--train.learning_rat", "1e-6"])
    assert "(did you mean --train.learning_rate?)" in capsys.readouterr().err


def test_another_commands_flag_is_named_as_not_this_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check-data", "--data", "pairs.jsonl"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --data (check-data has no --data: preftune check-data --help" in err
    assert "did you mean" not in err


def test_a_flag_is_never_abbreviated(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--train.learning", "1e-6"])
    assert "unrecognized arguments: --train.learning" in capsys.readouterr().err


# --------------------------------------------------------------------------- precedence


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 2.0e-6\n  seed: 7\n")
    return str(path)


def config_of(argv: list[str], config: str | None = None) -> RunConfig:
    return load_config(config, parsed(argv), command="train", notices=[])


def test_the_yaml_file_overrides_the_defaults(run_yaml):
    assert config_of(["train"], run_yaml).train.learning_rate == 2e-6


def test_a_flag_overrides_the_yaml_file(run_yaml):
    config = config_of(["train", "--train.learning_rate", "3e-6"], run_yaml)
    assert (config.train.learning_rate, config.train.seed) == (3e-6, 7)


def test_set_overrides_the_yaml_file(run_yaml):
    assert config_of(["train", "--set", "train.learning_rate=3e-6"], run_yaml).train.learning_rate == 3e-6


def test_among_flags_the_later_one_wins_whatever_its_spelling():
    orders = {
        ("--set", "train.seed=1", "--train.seed", "2"): 2,
        ("--train.seed", "2", "--set", "train.seed=1"): 1,
        ("--seed", "3", "--train.seed", "2"): 2,
        ("--train.seed", "2", "--seed", "3"): 3,
    }
    for argv, seed in orders.items():
        assert config_of(["train", *argv]).train.seed == seed, argv


def test_the_commands_own_flags_take_their_place_among_the_others():
    first = config_of(["train", "--model", "a", "--model.name_or_path", "b"])
    last = config_of(["train", "--model.name_or_path", "b", "--model", "a"])
    assert (first.model.name_or_path, last.model.name_or_path) == ("b", "a")


def test_flags_for_online_and_ppo_equal_their_keys():
    rounds = load_config(
        None, parsed(["online", "--rounds", "5", "--online.samples_per_prompt", "3"]), command="online"
    )
    steps = load_config(None, parsed(["ppo", "--kl-coef", "0.2", "--ppo.steps", "9"]), command="ppo")
    assert (rounds.online.rounds, rounds.online.samples_per_prompt) == (5, 3)
    assert (steps.ppo.kl_coef, steps.ppo.steps) == (0.2, 9)


def test_a_bad_flag_value_ends_in_one_line_naming_the_key(tmp_path, capsys):
    code = main(
        ["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o"), "--train.seed", "x"]
    )
    err = capsys.readouterr().err.strip()
    assert (code, err) == (2, "preftune: error: train.seed: expected an integer, got 'x'")
