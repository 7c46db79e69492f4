"""Online DPO under bad inputs and interruptions, run through the command line as a user would:
a round whose every pair is dropped, reward functions that answer wrongly or never, a resume
with another reward, a signal while sampling, a function given where a model is expected.

Each refusal ends in exit code 2 with one line on stderr naming the file, line or key, no
traceback, and the inputs (and an earlier run) untouched. A run that would spin is stopped by a
watchdog alarm and fails the test instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from preftune.cli import main
from preftune.engine.guard import batch_of
from preftune.engine.task import data_stream
from preftune.errors import ConfigError, DataError, ScorerError
from preftune.experiments.synthetic import SentimentTask, build_tokenizer, tiny_llama, tiny_reward_model
from preftune.generation.scoring import FunctionScorer

LONG = "review of the park: " + " ".join(["great calm day"] * 20)  # about 190 tokens
SHORT = [f"review of the {topic}:" for topic in ("park", "movie", "book", "song")]

REWARDS = """
import threading

def words(prompts, completions):
    return [float(len(c.split())) for c in completions]

def distinct(prompts, completions):
    return [float(i) for i in range(len(completions))]

def as_dict(prompts, completions):
    return {i: 1.0 for i in range(len(completions))}

def all_nan(prompts, completions):
    return [float("nan")] * len(completions)

def never(prompts, completions):
    threading.Event().wait()

def marked_then_never(prompts, completions):
    open(__file__ + ".scoring", "w").close()
    threading.Event().wait()
"""


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny policy, a reward model, prompt files and reward functions, each in its own place."""
    folder = tmp_path_factory.mktemp("online-bad")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer), seed=1).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    tiny_reward_model(len(tokenizer), seed=2).save_pretrained(folder / "rm")
    tokenizer.save_pretrained(folder / "rm")
    _jsonl(folder / "prompts.jsonl", [{"prompt": p} for p in SHORT])
    _jsonl(folder / "long-first.jsonl", [{"prompt": LONG}, {"prompt": LONG}] + [{"prompt": p} for p in SHORT])
    _jsonl(folder / "all-long.jsonl", [{"prompt": LONG}] * 3)
    (folder / "rw.py").write_text(REWARDS)
    return folder


def online(setup, output, *extra, prompts="prompts.jsonl", reward="words"):
    return [
        "online", "--model", str(setup / "model"), "--prompts", str(setup / prompts),
        "--reward", f"{setup / 'rw.py'}:{reward}", "--rounds", "1", "--samples-per-prompt", "2",
        "--output", str(output), "--set", "rollout.max_new_tokens=4", "--set", "train.max_steps=1",
        "--set", "train.report_to=none", "--set", "train.progress=false", "--set", "train.batch_size=2",
        "--set", "online.final_samples=false", *extra,
    ]  # fmt: skip


def snapshot(folder):
    """Every file under ``folder`` with its bytes (the lock file aside: a run takes it and lets go)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".preftune.lock"
    }


def refused(capsys, argv, expected):
    """The command ends in exit code 2 with one line naming what is wrong, its last (transformers' bars
    for the weights it loaded may come before); returns that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    said = [line for line in err.strip().splitlines() if line.startswith("preftune:")]
    assert len(said) == 1 and said[0].startswith("preftune: error: ") and err.endswith(said[0] + "\n"), err
    assert expected in said[0], said[0]
    assert "Traceback" not in err
    return said[0]


@pytest.fixture
def watchdog():
    """A run that spins is interrupted after two minutes and fails the test, instead of hanging it."""

    def fire(number, frame):
        raise TimeoutError("still running after 120 s: a loop spins")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- nothing spins


def test_an_endless_stream_over_no_examples_is_refused_at_once():
    with pytest.raises(DataError, match="no examples to train on"):
        data_stream(0, seed=0, shuffle=True)
    assert [next(stream) for stream in [data_stream(2, 0, False)] for _ in range(5)] == [0, 1, 0, 1, 0]


def test_prompts_that_all_fill_max_length_are_refused_before_anything_loads(
    setup, tmp_path, capsys, watchdog
):
    before = (setup / "all-long.jsonl").read_bytes()
    argv = online(setup, tmp_path / "out", "--set", "data.max_length=64", prompts="all-long.jsonl")
    line = refused(capsys, argv, f"{setup / 'all-long.jsonl'}: every prompt fills data.max_length=64")
    assert f"the shortest, {setup / 'all-long.jsonl'}:1, is" in line and "data.max_prompt_length" in line
    assert not (tmp_path / "out").exists()
    assert (setup / "all-long.jsonl").read_bytes() == before


def test_a_round_whose_every_pair_is_dropped_stops_naming_the_cause_and_the_prompts_and_never_spins(
    setup, tmp_path, capsys, watchdog
):
    # Round 1 takes the first two prompts, both over data.max_length; the others are short.
    argv = online(
        setup, tmp_path / "out", "--set", "data.max_length=64", "--set", "online.prompts_per_round=2",
        prompts="long-first.jsonl", reward="distinct",
    )  # fmt: skip
    started = time.monotonic()
    with pytest.warns(UserWarning) as caught:
        line = refused(capsys, argv, "round 1: every pair was dropped (2 of 2): prompts of ")
    assert time.monotonic() - started < 100
    where = setup / "long-first.jsonl"
    assert f"fill data.max_length=64 and leave no room for a completion ({where}:1, {where}:2)" in line
    said = [str(w.message) for w in caught]
    assert any(
        s.startswith(f"{where}: 2 of 6 prompts fill data.max_length=64 ({where}:1, {where}:2)") for s in said
    )
    assert any(
        s.startswith(f"{where}:1: field 'prompt' is ") for s in said
    )  # the pair is named after its prompt
    assert not (tmp_path / "out" / "round-01" / "train" / "final").exists()
    assert not (tmp_path / "out" / "final").exists()


# --------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "answer, message",
    [
        ({0: 1.0, 1: 1.0}, "must return a list of 2 numbers, one per completion, got dict on batch 1 of 1"),
        ({1.0, 2.0}, "got set on batch 1 of 1"),
        ("12", "got str"),
        ((x for x in (1.0, 2.0)), "got generator"),
        (["1.0", "2.0"], "returned str '1.0' at position 0 on batch 1 of 1"),
        (np.ones((2, 2)), "returned an array of shape (2, 2) on batch 1 of 1"),
        ([1.0], "returned 1 scores for 2 completions on batch 1 of 1"),
    ],
    # (a list of K-number rows is an ensemble's answer, aggregated: tests/test_reward_ensemble.py)
    ids=["dict", "set", "text", "generator", "strings", "array-two-columns", "too-few"],
)
def test_a_reward_that_is_not_one_number_per_completion_is_refused_naming_the_function(
    monkeypatch, answer, message
):
    scorer = scorer_returning(monkeypatch, answer)
    with pytest.raises(ScorerError, match=r"^reward function m:f ") as info:
        scorer(["p", "p"], ["a", "b"])
    assert message in str(info.value)


def scorer_returning(monkeypatch, answer):
    """``m:f``, a function answering ``answer`` to every call, as online DPO calls it."""
    import preftune.generation.scoring as scoring

    monkeypatch.setattr(scoring, "import_function", lambda spec: lambda prompts, completions: answer)
    return FunctionScorer("m:f", batch_size=8, allow_unscored=True)


def test_numbers_of_every_kind_are_read_as_rewards_and_none_as_unscored(monkeypatch):
    for answer in ([1, 2.5, None], (np.float32(1), 2.5, None), torch.tensor([[1.0], [2.5], [float("nan")]])):
        values = scorer_returning(monkeypatch, answer)(["p"] * 3, ["a", "b", "c"])
        assert values[:2] == [1.0, 2.5] and values[2] != values[2]


def test_a_reward_function_returning_a_dict_stops_the_online_run_in_one_line_before_samples_are_saved(
    setup, tmp_path, capsys, watchdog
):
    refused(
        capsys,
        online(setup, tmp_path / "out", reward="as_dict"),
        f"reward function {setup / 'rw.py'}:as_dict must return a list of 8 numbers, one per completion, got dict",
    )
    assert not (tmp_path / "out" / "round-01" / "samples.jsonl").exists()


def test_a_reward_function_that_never_returns_is_stopped_by_reward_timeout_naming_it_and_the_batch(
    setup, tmp_path, capsys, watchdog
):
    started = time.monotonic()
    line = refused(
        capsys,
        online(
            setup,
            tmp_path / "out",
            "--set",
            "reward.timeout=1",
            "--set",
            "reward.batch_size=4",
            reward="never",
        ),
        f"reward function {setup / 'rw.py'}:never did not return within reward.timeout=1 seconds on "
        "batch 1 of 2 (completions 0 to 3 of 8)",
    )
    assert "raise reward.timeout" in line and time.monotonic() - started < 100
    assert not (tmp_path / "out" / "round-01" / "samples.jsonl").exists()


def test_rewards_that_are_all_nan_are_blamed_on_the_scorer_by_name_not_on_the_temperature(
    setup, tmp_path, capsys, watchdog
):
    line = refused(
        capsys,
        online(setup, tmp_path / "out", reward="all_nan"),
        f"reward function {setup / 'rw.py'}:all_nan returned NaN or None (unscored) for every one of the 8 samples",
    )
    assert "temperature" not in line
    assert not (tmp_path / "out" / "round-01" / "samples.jsonl").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_reward_timeout_that_is_not_a_positive_number_of_seconds_is_refused_naming_the_key(value):
    from preftune.config import load_config

    expected = "must be > 0 seconds" if value in ("0", "-1") else "expected a finite number"
    with pytest.raises(ConfigError, match=rf"^reward.timeout: {expected}"):
        load_config(overrides=[f"reward.timeout={value}"], command="online")
    assert load_config(overrides=["reward.timeout=null"], command="ppo").reward.timeout is None


# --------------------------------------------------------------------------- resume


def test_resuming_with_another_reward_function_is_refused_naming_both_and_the_run_is_untouched(
    setup, tmp_path, capsys, watchdog
):
    out = tmp_path / "out"
    assert main(online(setup, out)) == 0
    before = snapshot(out)
    argv = online(setup, out, "--resume", "--rounds", "2", reward="distinct")
    line = refused(
        capsys,
        argv,
        f"reward.scorer: the online run in {out} was scored by reward function {setup / 'rw.py'}:words, and this "
        f"run would score with reward function {setup / 'rw.py'}:distinct",
    )
    assert "Resume with the same --reward" in line
    assert snapshot(out) == before
    assert json.loads((out / "scorer.json").read_text())["function"] == f"{setup / 'rw.py'}:words"


def test_resuming_with_a_reward_model_whose_files_changed_is_refused_and_a_moved_one_is_not(
    setup, tmp_path, tokenizer
):
    from helpers import quiet_config

    from preftune.generation.scoring import RewardModelScorer
    from preftune.recipes.online import train_online

    rm, moved = tmp_path / "rm", tmp_path / "moved-rm"
    tiny_reward_model(len(tokenizer), seed=2).save_pretrained(rm)
    tokenizer.save_pretrained(rm)

    def run(scorer_folder, *overrides, **kwargs):
        config = quiet_config(
            str(tmp_path / "out"), "online.rounds=1", "online.samples_per_prompt=2", "rollout.max_new_tokens=4",
            "train.batch_size=2", "train.max_steps=2", "train.save_every=1", "online.final_samples=false",
            *overrides,
        )  # fmt: skip
        return train_online(
            config,
            model=tiny_llama(len(tokenizer), seed=1),
            tokenizer=tokenizer,
            prompts=[{"prompt": p} for p in SentimentTask().prompts(4, 0)],
            scorer=RewardModelScorer(str(scorer_folder), device="cpu"),
            **kwargs,
        )

    assert run(rm, stop_in_round=(1, 1)).final_dir is None  # round 1's samples saved, its training stopped
    rm.rename(moved)  # the same files in another place: the same reward model
    assert run(moved, "train.resume=true").final_dir is not None
    tiny_reward_model(len(tokenizer), seed=3).save_pretrained(moved)  # other weights in the same folder
    with pytest.raises(
        ConfigError,
        match=r"scored by reward model .*moved-rm, and this run would score with reward model .*moved-rm as it "
        r"is now \(its files changed\)",
    ):
        run(moved, "train.resume=true", "online.rounds=2")


# --------------------------------------------------------------------------- signals


def test_sigterm_while_sampling_stops_the_run_with_a_message_and_resume_finishes_it(
    setup, tmp_path, capsys, monkeypatch, watchdog
):
    from preftune.generation.rollout import TransformersRollout

    generate = TransformersRollout.generate

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return generate(self, *args, **kwargs)

    out, handler = tmp_path / "out", signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(TransformersRollout, "generate", interrupted)
        capsys.readouterr()
        assert main(online(setup, out)) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("preftune:")] == [
        "preftune: stopped by SIGTERM during round 1's sampling and scoring; run the same command with "
        "--resume to continue (complete rounds and saved samples are reused)"
    ]
    assert signal.getsignal(signal.SIGTERM) is handler  # the run gave the handlers back
    assert not (out / "round-01" / "samples.jsonl").exists()
    assert main(online(setup, out, "--resume")) == 0
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_sigterm_to_the_real_command_while_a_reward_function_hangs_ends_it_at_once_with_exit_143(
    setup, tmp_path
):
    marker = setup / "rw.py.scoring"
    marker.unlink(missing_ok=True)
    command = [sys.executable, "-c", "import preftune.cli, sys; sys.exit(preftune.cli.main(sys.argv[1:]))"]
    argv = online(setup, tmp_path / "out", reward="marked_then_never")
    process = subprocess.Popen(
        [*command, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the reward function was never called"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # a spin or an ignored signal fails here
    assert process.returncode == 143
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "preftune: stopped by SIGTERM during round 1's sampling and scoring; run the same command with --resume"
        )
    )
    assert "Traceback" not in err


# --------------------------------------------------------------------------- messages


def test_a_batch_names_each_record_once_and_counts_the_unnamed_ones():
    assert batch_of(["", "", "", ""]) == "a batch of 4 unnamed records"
    assert batch_of(["p.jsonl:1", "p.jsonl:1", "p.jsonl:2"]) == "a batch of records p.jsonl:1, p.jsonl:2"
    names = [f"d.jsonl:{i}" for i in range(1, 7)] + ["", ""]
    assert batch_of(names) == (
        "a batch of records d.jsonl:1, d.jsonl:2, d.jsonl:3, d.jsonl:4 and 2 more and 2 unnamed"
    )


@pytest.mark.parametrize("command", ["eval", "rm score"])
def test_a_function_given_where_a_reward_model_is_expected_says_to_use_reward(
    setup, tmp_path, capsys, command
):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    output = tmp_path / ("out" if command == "eval" else "scores.jsonl")
    if command == "eval":
        flag = "--reward-model"
        argv = ["eval", "--policy", str(setup / "model"), flag, "rw:const", "--data", f"d={data}"]
    else:
        flag = "--model"
        argv = ["rm", "score", flag, "rw:const", "--data", str(data)]
    refused(
        capsys,
        [*argv, "--output", str(output)],
        f"{flag}: 'rw:const' names a function (module:function), not a model folder or hub name; a reward "
        "function is given with --reward",
    )
    assert not output.exists()
