"""Faults lose nothing: non-finite numbers, signals, kill -9, a failing rerun, a full disk,
a crafted checkpoint. The subprocess tests run the real command line."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from helpers import quiet_config, sentiment_records

import preftune.engine.checkpoint as checkpoint_module
from preftune.cli import main
from preftune.engine.guard import NonFiniteError
from preftune.errors import CheckpointError, ConfigError
from preftune.experiments.synthetic import build_tokenizer, tiny_llama
from preftune.recipes.dpo import train

RECORDS = sentiment_records(16, seed=11)


def _train(tmp_path, tokenizer, *overrides, name="run", **kwargs):
    cfg = quiet_config(str(tmp_path / name), "train.batch_size=4", *overrides)
    return train(
        cfg, model=tiny_llama(len(tokenizer), seed=2), tokenizer=tokenizer, train_data=RECORDS, **kwargs
    )


def _losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


# --------------------------------------------------------------------------- non-finite numbers


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_records_and_saves_nothing_non_finite(
    tmp_path, tokenizer
):
    with pytest.raises(NonFiniteError) as info:
        _train(
            tmp_path,
            tokenizer,
            "train.learning_rate=1e20",
            "train.max_grad_norm=null",
            "train.max_steps=6",
            "train.save_every=1",
        )
    message = str(info.value)
    assert (
        message.startswith("step 2: the loss") and "record " in message and "train.nonfinite=skip" in message
    )
    assert "the last good checkpoint is" in message and "checkpoint-1" in message
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (tmp_path / "run" / "final").exists()
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def _on_objective_calls(monkeypatch, act):
    """Wrap the pairwise recipe's objective so that ``act(call_number, output)`` runs on every
    call (one call per step here): to poison a step with NaN, or to send the process a signal."""
    import preftune.recipes.dpo as pairwise

    build = pairwise.build_objective

    class Wrapped:
        def __init__(self, objective):
            self.objective, self.calls = objective, 0

        def __getattr__(self, name):
            return getattr(self.objective, name)

        def __call__(self, stats):
            self.calls += 1
            out = self.objective(stats)
            act(self.calls, out)
            return out

    monkeypatch.setattr(pairwise, "build_objective", lambda cfg: Wrapped(build(cfg)))


def _poison_objective_at(monkeypatch, calls):
    """The objective returns NaN losses on the given calls."""

    def poison(call, out):
        if call in calls:
            out.losses = out.losses * float("nan")

    _on_objective_calls(monkeypatch, poison)


def test_non_finite_steps_can_be_skipped_and_counted(tmp_path, tokenizer, monkeypatch):
    _poison_objective_at(monkeypatch, {1, 3})
    result = _train(tmp_path, tokenizer, "train.max_steps=6", "train.nonfinite=skip")
    assert result.history[-1]["skipped_steps"] == 2.0 and result.final_dir is not None
    assert [h["step"] for h in result.history if "loss" in h] == [2, 4, 5, 6]
    assert all(h["loss"] == h["loss"] for h in result.history if "loss" in h)  # no NaN reached the logs


def test_skipping_stops_once_the_limit_of_skipped_steps_is_reached(tmp_path, tokenizer, monkeypatch):
    _poison_objective_at(monkeypatch, {1, 2, 4})
    with pytest.raises(NonFiniteError, match=r"^step 4: the loss \(nan\)"):
        _train(tmp_path, tokenizer, "train.max_steps=6", "train.nonfinite=skip", "train.max_skipped_steps=3")


# --------------------------------------------------------------------------- the output folder


def test_a_failing_second_run_leaves_the_finished_runs_final_folder_untouched(tmp_path, tokenizer):
    first = _train(tmp_path, tokenizer, "train.max_steps=2")
    before = {p.name: p.read_bytes() for p in first.final_dir.iterdir()}
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    cfg = quiet_config(str(tmp_path / "run"), "train.overwrite=true", f"model.name_or_path={broken}")
    with pytest.raises(Exception):  # noqa: B017  (the model cannot load: any error will do)
        train(cfg, tokenizer=tokenizer, train_data=RECORDS)
    assert {p.name: p.read_bytes() for p in first.final_dir.iterdir()} == before


def test_a_fresh_run_refuses_a_folder_holding_a_finished_run(tmp_path, tokenizer):
    _train(tmp_path, tokenizer, "train.max_steps=1")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(final/\).*--resume.*train.overwrite"):
        _train(tmp_path, tokenizer, "train.max_steps=1")


def test_an_output_path_that_is_a_file_is_refused_before_anything_loads(tmp_path, tokenizer):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^train.output_dir: .*run is a file, not a folder"):
        _train(tmp_path, tokenizer, "train.max_steps=1")


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(checkpoint_module.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"^train.output_dir: .* cannot be written"):
        _train(tmp_path, tokenizer, "train.max_steps=1")


def test_a_full_disk_says_so_keeps_the_last_checkpoint_and_leaves_no_temporary_folder(
    tmp_path, tokenizer, monkeypatch
):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"the disk is full.*checkpoint-1, is kept"):
        _train(tmp_path, tokenizer, "train.max_steps=3", "train.save_every=1")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "checkpoint-1" in names and not [n for n in names if n.startswith(".tmp")]


def test_a_stray_temporary_checkpoint_is_removed_at_the_next_start(tmp_path, tokenizer):
    _train(tmp_path, tokenizer, "train.max_steps=2", "train.save_every=1", stop_after=1)
    (tmp_path / "run" / ".tmp-checkpoint-2").mkdir()  # what kill -9 mid-save leaves
    _train(tmp_path, tokenizer, "train.max_steps=2", "train.save_every=1", "train.resume=true")
    assert not list((tmp_path / "run").glob(".tmp-*"))


# --------------------------------------------------------------------------- nothing loaded runs code


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resuming_from_a_checkpoint_whose_state_files_were_crafted_runs_nothing(tmp_path, tokenizer):
    _train(tmp_path, tokenizer, "train.max_steps=2", "train.save_every=1", stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (checkpoint / name).write_bytes(pickle.dumps({"state": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="cannot resume from this checkpoint"):
        _train(tmp_path, tokenizer, "train.max_steps=2", "train.save_every=1", "train.resume=true")
    assert not marker.exists()


def test_a_crafted_reference_cache_runs_nothing(tmp_path, tokenizer):
    from preftune.errors import ReferenceCacheError

    (tmp_path / "run").mkdir()
    marker = tmp_path / "pwned"
    (tmp_path / "run" / "reference_logps.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ReferenceCacheError, match="unreadable"):
        _train(tmp_path, tokenizer, "train.max_steps=1", "reference.strategy=precomputed")
    assert not marker.exists()


def test_checkpoint_state_files_hold_no_pickled_objects(tmp_path, tokenizer):
    _train(tmp_path, tokenizer, "train.max_steps=1", "train.save_every=1")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "rng.json").is_file() and (checkpoint / "rng.safetensors").is_file()
    assert not (checkpoint / "rng.pt").exists()
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.load(checkpoint / name, weights_only=True)  # plain tensors and containers only


# --------------------------------------------------------------------------- signals


def _signal_at_call(monkeypatch, call, number):
    """The process sends itself ``number`` during the ``call``-th step."""

    def send(n, out):
        if n == call:
            os.kill(os.getpid(), number)

    _on_objective_calls(monkeypatch, send)


@pytest.mark.parametrize(
    "number, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_finishes_the_step_checkpoints_it_and_resume_reproduces_the_uninterrupted_losses(
    tmp_path, tokenizer, monkeypatch, number, code
):
    from preftune.engine.guard import StopRequested

    settings = ("train.max_steps=8", "train.save_every=4")
    whole = _train(tmp_path, tokenizer, *settings, name="whole")
    with monkeypatch.context() as patch:
        _signal_at_call(patch, 3, number)
        with pytest.raises(
            StopRequested, match=r"after step 3; saved .*checkpoint-3; run the same command"
        ) as stopped:
            _train(tmp_path, tokenizer, *settings, name="cut")
    assert stopped.value.exit_code == code  # 128 + the signal that stopped this run
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    _train(tmp_path, tokenizer, *settings, "train.resume=true", name="cut")
    assert _losses(tmp_path / "cut") == {h["step"]: h["loss"] for h in whole.history}


def test_the_command_line_exits_with_128_plus_the_signal_and_says_how_to_resume(
    tmp_path, capsys, monkeypatch
):
    import preftune.recipes.dpo as pairwise
    from preftune.engine.guard import StopRequested

    def stopped(config, **kwargs):
        raise StopRequested(
            "stopped by SIGTERM after step 3; saved run/checkpoint-3; run the same "
            "command with --resume to continue",
            143,
        )

    monkeypatch.setattr(pairwise, "train", stopped)
    assert main(["train", "--model", "m", "--data", "d.jsonl"]) == 143
    err = capsys.readouterr().err
    assert err.startswith("preftune: stopped by SIGTERM") and "error" not in err


# --------------------------------------------------------------------------- kill -9, on the real command


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """A model a little larger than the tests' usual, so steps last long enough to interrupt."""
    folder = tmp_path_factory.mktemp("cli")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer), hidden_size=128, layers=2, heads=4, seed=1).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(64, seed=12)))
    return folder


def _arguments(setup, output, *extra):
    return [
        "train", "--model", str(setup / "model"), "--data", str(setup / "pairs.jsonl"), "--output", str(output),
        "--set", "train.batch_size=8", "--set", "train.max_steps=16", "--set", "train.save_every=3",
        "--set", "train.log_every=1", "--set", "train.report_to=none", "--set", "train.mixed_precision=no",
        "--set", "train.learning_rate=1e-3", *extra,
    ]  # fmt: skip


def _kill_at(arguments, step):
    """Run the command in a subprocess and kill -9 it once it logged ``step``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "import preftune.cli, sys; preftune.cli.main(sys.argv[1:])", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    return process.returncode, "".join(seen)


def test_kill_9_at_several_points_resumes_to_the_uninterrupted_losses(cli_setup):
    whole, killed = cli_setup / "whole", cli_setup / "killed"
    assert main(_arguments(cli_setup, whole)) == 0
    for step, extra in ((5, []), (10, ["--resume"])):
        returncode, out = _kill_at(_arguments(cli_setup, killed, *extra), step)
        assert returncode == -signal.SIGKILL, out
        assert "token ids reused from" in out  # the pairs come from the store the first run wrote
    assert main(_arguments(cli_setup, killed, "--resume")) == 0
    assert _losses(killed) == _losses(whole)
    assert not list(killed.glob(".tmp-*"))
