"""One run loop: a signal, a non-finite step and a checkpoint behave the same in PPO as in DPO,
on the real command line (the same messages, up to steps and paths; the same exit codes, folders
and resume). Each run is provoked at its loss: DPO's objective, PPO's value loss, each called once
a step here."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from helpers import sentiment_records

import preftune.recipes.dpo as dpo_recipe
import preftune.recipes.ppo as ppo_recipe
from preftune.cli import main
from preftune.experiments.common import one_thread
from preftune.experiments.synthetic import TOPICS, SentimentTask, tiny_llama
from preftune.losses.ppo import Clipped

RECIPES = ("dpo", "ppo")
COMMON = [
    "--set", "train.batch_size=2", "--set", "train.log_every=1", "--set", "train.report_to=none",
    "--set", "train.progress=false", "--set", "train.mixed_precision=no", "--set", "train.save_every=null",
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> Path:
    """A tiny model, 8 preference pairs, 8 prompts and a reward function, on disk as a user would
    have them."""
    folder = tmp_path_factory.mktemp("inputs")
    tiny_llama(len(tokenizer), seed=0).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(8)))
    prompts = [SentimentTask.prompt(topic) for topic in TOPICS[:8]]  # all different
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # A reward an untrained model's samples already vary in: their length.
    (folder / "reward.py").write_text(
        "def characters(prompts, completions):\n    return [len(c) / 20 for c in completions]\n"
    )
    return folder


def command(recipe: str, files: Path, output: Path, *extra: str) -> list[str]:
    """Three steps of DPO (one micro-batch of 2 pairs a step) or of PPO (2 rollouts a step, one
    update), so that each computes its loss once a step."""
    if recipe == "dpo":
        head = ["train", "--data", str(files / "pairs.jsonl"), "--set", "train.max_steps=3"]
    else:
        head = [
            "ppo", "--prompts", str(files / "prompts.jsonl"), "--steps", "3",
            "--reward", f"{files / 'reward.py'}:characters",
            "--set", "ppo.rollouts_per_step=2", "--set", "ppo.ppo_epochs=1", "--set", "ppo.num_mini_batches=1",
            "--set", "rollout.max_new_tokens=4",
        ]  # fmt: skip
    return [*head, "--model", str(files / "model"), "--output", str(output), *COMMON, *extra]


def at_step(monkeypatch: Any, recipe: str, step: int, act: Callable[[Any], Any]) -> None:
    """``act`` gets (and returns) the recipe's loss output of step ``step``."""
    calls = count(1)
    if recipe == "ppo":
        real = ppo_recipe.value_loss

        def value_loss(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            return act(out) if next(calls) == step else out

        monkeypatch.setattr(ppo_recipe, "value_loss", value_loss)
        return
    build = dpo_recipe.build_objective

    class Objective:
        def __init__(self, objective: Any):
            self.objective = objective

        def __getattr__(self, name: str) -> Any:
            return getattr(self.objective, name)

        def __call__(self, stats: Any) -> Any:
            out = self.objective(stats)
            return act(out) if next(calls) == step else out

    monkeypatch.setattr(dpo_recipe, "build_objective", lambda cfg: Objective(build(cfg)))


def send(number: int) -> Callable[[Any], Any]:
    def act(out: Any) -> Any:
        os.kill(os.getpid(), number)
        return out

    return act


def poison(out: Any) -> Any:
    """NaN losses: DPO's per pair, PPO's value loss per token."""
    if isinstance(out, Clipped):
        return Clipped(out.loss * float("nan"), out.clipped)
    out.losses = out.losses * float("nan")
    return out


def run(recipe: str, files: Path, output: Path, capsys: Any, *extra: str) -> tuple[int, str]:
    """The command's exit code and what it said (stdout and stderr), its output folder written as
    OUT and the records of a batch as RECORDS."""
    capsys.readouterr()
    with one_thread():
        code = main(command(recipe, files, output, *extra))
    captured = capsys.readouterr()
    said = (captured.out + captured.err).replace(str(output), "OUT")
    return code, re.sub(r"records \S+\.jsonl:\d+(, \S+\.jsonl:\d+)*", "records RECORDS", said)


def lines_with(text: str, words: str) -> list[str]:
    return [line for line in text.splitlines() if words in line]


def logged(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("number", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_checkpoints_the_step_and_exits_with_the_same_message_and_code_in_ppo_as_in_dpo(
    files, tmp_path, capsys, monkeypatch, number, code
):
    said = {}
    for recipe in RECIPES:
        with monkeypatch.context() as patch:
            at_step(patch, recipe, 2, send(number))
            exit_code, said[recipe] = run(recipe, files, tmp_path / recipe, capsys)
        assert exit_code == code, recipe
        assert sorted(p.name for p in (tmp_path / recipe).glob("checkpoint-*")) == ["checkpoint-2"]
    name = signal.Signals(number).name
    expected = (
        f"preftune: stopped by {name} after step 2; saved OUT/checkpoint-2; run the same command "
        "with --resume to continue"
    )
    assert lines_with(said["dpo"], "stopped by") == lines_with(said["ppo"], "stopped by") == [expected]


def test_a_non_finite_step_stops_ppo_as_it_stops_dpo_naming_the_step_with_exit_code_2(
    files, tmp_path, capsys, monkeypatch
):
    said = {}
    for recipe in RECIPES:
        with monkeypatch.context() as patch:
            at_step(patch, recipe, 2, poison)
            exit_code, said[recipe] = run(
                recipe, files, tmp_path / recipe, capsys, "--set", "train.save_every=1"
            )
        assert exit_code == 2, recipe
        assert not (tmp_path / recipe / "final").exists()
    expected = (
        "preftune: error: step 2: the loss (nan) or gradient norm (nan) is not finite, in a batch of records "
        "RECORDS; the weights were not updated and the last good checkpoint is OUT/checkpoint-1. Lower "
        "train.learning_rate or set train.max_grad_norm and --resume, or --set train.nonfinite=skip"
    )
    assert lines_with(said["dpo"], "not finite") == lines_with(said["ppo"], "not finite") == [expected]


def test_a_skipped_non_finite_update_is_said_and_counted_alike_in_ppo_and_dpo(
    files, tmp_path, capsys, monkeypatch
):
    said, counted = {}, {}
    for recipe in RECIPES:
        with monkeypatch.context() as patch:
            at_step(patch, recipe, 2, poison)
            exit_code, said[recipe] = run(
                recipe, files, tmp_path / recipe, capsys, "--set", "train.nonfinite=skip"
            )
        assert exit_code == 0 and (tmp_path / recipe / "final").is_dir(), recipe
        # DPO counts skipped steps (one update each), PPO skipped updates (several a step): here one each.
        name = "skipped_steps" if recipe == "dpo" else "skipped_updates"
        counted[recipe] = [row.get(name) for row in logged(tmp_path / recipe)]
    skipped = "step 2: a non-finite loss or gradient, update skipped (1 so far)"
    assert lines_with(said["dpo"], "skipped") == lines_with(said["ppo"], "skipped") == [skipped]
    assert counted["dpo"] == counted["ppo"] == [None, 1.0, 1.0]


def test_checkpoints_of_ppo_are_named_and_kept_as_those_of_dpo(files, tmp_path, capsys):
    kept = {}
    for recipe in RECIPES:
        settings = ("--set", "train.save_every=1", "--set", "train.save_total_limit=2")
        assert run(recipe, files, tmp_path / recipe, capsys, *settings)[0] == 0
        kept[recipe] = sorted(p.name for p in (tmp_path / recipe).iterdir() if p.is_dir())
    assert kept["dpo"] == kept["ppo"] == ["checkpoint-2", "checkpoint-3", "final"]
    state = json.loads((tmp_path / "ppo" / "checkpoint-3" / "preftune_state.json").read_text())
    assert state["step"] == 3 and (tmp_path / "ppo" / "checkpoint-3" / "value").is_dir()


def test_an_interrupted_ppo_run_resumes_as_an_interrupted_dpo_run_does(files, tmp_path, capsys, monkeypatch):
    said = {}
    for recipe in RECIPES:
        whole = tmp_path / recipe / "whole"
        cut = tmp_path / recipe / "cut"
        assert run(recipe, files, whole, capsys)[0] == 0
        with monkeypatch.context() as patch:
            at_step(patch, recipe, 2, send(signal.SIGTERM))
            assert run(recipe, files, cut, capsys)[0] == 143
        exit_code, said[recipe] = run(recipe, files, cut, capsys, "--resume")
        assert exit_code == 0, recipe
        # Each step logged once, as the uninterrupted run logged it.
        losses = [(row["step"], row["loss"]) for row in logged(whole)]
        assert [(row["step"], row["loss"]) for row in logged(cut)] == losses, recipe
        assert len({loss for _, loss in losses}) == 3, recipe  # it trained: the steps differ
    resumed = "resumed from OUT/checkpoint-2 at step 2"
    assert lines_with(said["dpo"], "resumed") == lines_with(said["ppo"], "resumed") == [resumed]
