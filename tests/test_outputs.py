"""Nothing a user already has is overwritten: every output is checked before any work, a folder
holds one kind of run and one run at a time, an output is never an input, and a pipeline's
stages write inside its output folder only. Each case runs the command line as a user would and
checks the exit code, the one line it prints, and that the earlier run's (or the input's) bytes
are unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import QUIET_FLAGS, sentiment_records

import preftune.data.outputs as outputs
from preftune.cli import main
from preftune.errors import ConfigError
from preftune.experiments.synthetic import TOPICS, SentimentTask, tiny_llama

QUIET = QUIET_FLAGS
SAMPLING = ["--set", "rollout.max_new_tokens=4", "--set", "train.batch_size=2", *QUIET]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> Path:
    """A tiny model, preference pairs, prompts and a reward function, on disk."""
    folder = tmp_path_factory.mktemp("inputs")
    tiny_llama(len(tokenizer), seed=0).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(8)))
    prompts = [SentimentTask.prompt(topic) for topic in TOPICS[:4]]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (folder / "reward.py").write_text(
        "def length(prompts, completions):\n    return [sum(map(ord, c)) % 97 for c in completions]\n"
    )
    return folder


def train_argv(files: Path, output: Path, *extra: str, command: tuple[str, ...] = ("train",)) -> list[str]:
    return [*command, "--model", str(files / "model"), "--data", str(files / "pairs.jsonl"),
            "--output", str(output), "--set", "train.max_steps=1", "--set", "train.batch_size=4", *QUIET,
            *extra]  # fmt: skip


def sampling_argv(command: str, files: Path, output: Path, *extra: str) -> list[str]:
    steps = ["--rounds", "1", "--samples-per-prompt", "3", "--set", "train.max_steps=1"]
    if command == "ppo":
        steps = ["--steps", "1", "--set", "ppo.rollouts_per_step=2", "--set", "ppo.num_mini_batches=1"]
    return [command, "--model", str(files / "model"), "--prompts", str(files / "prompts.jsonl"),
            "--reward", f"{files / 'reward.py'}:length", "--output", str(output), *steps, *SAMPLING,
            *extra]  # fmt: skip


def eval_argv(files: Path, output: Path, policy: Path | None = None, data: Path | None = None) -> list[str]:
    return ["eval", "--policy", str(policy or files / "model"), "--data", f"set={data or files / 'pairs.jsonl'}",
            "--output", str(output)]  # fmt: skip


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *expected: str) -> str:
    """The command exits 2 with one line naming what is wrong, and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: "), err
    assert all(text in err[0] for text in expected), err[0]
    return err[0]


@pytest.fixture(scope="module")
def train_run(files, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "train-run"
    assert main(train_argv(files, output, "--set", "train.save_every=1")) == 0
    return output


@pytest.fixture(scope="module")
def online_run(files, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "online-run"
    assert main(sampling_argv("online", files, output)) == 0
    return output


# --------------------------------------------------------------------------- the kind of run a folder holds


@pytest.mark.parametrize(
    "command, kind",
    [
        ("train", "train"),
        ("sft", "sft"),
        ("rm", "rm"),
        ("online", "online"),
        ("ppo", "ppo"),
        ("eval", "eval"),
    ],
)
def test_every_run_folder_records_its_kind(files, tmp_path, command, kind):
    output = tmp_path / "out"
    if command in ("online", "ppo"):
        argv = sampling_argv(command, files, output)
    elif command == "eval":
        argv = eval_argv(files, output)
    else:
        argv = train_argv(files, output, command=("rm", "train") if command == "rm" else (command,))
        if command == "sft":
            (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": " b"}\n' * 4)
            argv[argv.index("--data") + 1] = str(tmp_path / "sft.jsonl")
    assert main(argv) == 0
    assert json.loads((output / "run.json").read_text())["kind"] == kind


def test_online_resume_into_a_train_run_is_refused_naming_both_and_the_train_run_is_unchanged(
    files, train_run, capsys
):
    before = snapshot(train_run)
    refused(
        capsys,
        sampling_argv("online", files, train_run, "--resume"),
        f"train.output_dir: {train_run} holds a train run (preftune train); this is an online run",
    )
    assert snapshot(train_run) == before


def test_ppo_resume_into_an_online_run_is_refused_naming_both_and_the_online_run_is_unchanged(
    files, online_run, capsys
):
    before = snapshot(online_run)
    refused(
        capsys,
        sampling_argv("ppo", files, online_run, "--resume"),
        "holds an online run (preftune online); this is a ppo run",
    )
    assert snapshot(online_run) == before


@pytest.mark.parametrize(
    "extra", [[], ["--resume"], ["--set", "train.overwrite=true"]], ids=["fresh", "resume", "overwrite"]
)
def test_train_into_an_online_folder_is_refused_however_it_is_asked_and_the_online_run_is_unchanged(
    files, online_run, capsys, extra
):
    before = snapshot(online_run)
    refused(capsys, train_argv(files, online_run, *extra), "holds an online run", "this is a train run")
    assert snapshot(online_run) == before


def test_a_folder_written_before_kinds_were_recorded_is_known_by_its_files(
    files, online_run, tmp_path, capsys
):
    older = tmp_path / "older"
    shutil.copytree(online_run, older)
    (older / "run.json").unlink()
    before = snapshot(older)
    refused(capsys, train_argv(files, older, "--resume"), "holds an online run")
    assert snapshot(older) == before


def test_a_folder_of_hugging_face_trainer_checkpoints_is_refused_as_another_kind_of_run(
    files, tmp_path, capsys
):
    trl_output = tmp_path / "trl-output"
    (trl_output / "checkpoint-500").mkdir(parents=True)
    (trl_output / "checkpoint-500" / "training_args.bin").write_bytes(b"TRL's arguments")
    before = snapshot(trl_output)
    refused(capsys, train_argv(files, trl_output), "holds a Hugging Face Trainer run")
    assert snapshot(trl_output) == before


# --------------------------------------------------------------------------- outputs are never inputs


@pytest.mark.parametrize("relation", ["is", "is inside", "contains"])
def test_an_output_folder_that_is_inside_or_contains_the_input_model_is_refused_and_the_model_is_unchanged(
    files, tmp_path, capsys, relation
):
    model = tmp_path / "models" / "basecopy"
    shutil.copytree(files / "model", model)
    output = {"is": model, "is inside": model / "run", "contains": model.parent}[relation]
    before = snapshot(model)
    argv = train_argv(files, output)
    argv[argv.index("--model") + 1] = str(model)
    refused(capsys, argv, f"train.output_dir: {output} {relation} the input model.name_or_path ({model})")
    assert snapshot(model) == before
    assert relation != "is inside" or not output.exists()


@pytest.mark.parametrize("command", ["sft", "rm train", "online", "ppo", "eval", "rm score"])
def test_every_command_refuses_to_write_into_its_input_model(files, tmp_path, capsys, command):
    model = tmp_path / "basecopy"
    shutil.copytree(files / "model", model)
    before = snapshot(model)
    if command in ("online", "ppo"):
        argv = sampling_argv(command, files, model)
    elif command == "eval":
        argv = eval_argv(files, model, policy=model)
    elif command == "rm score":
        argv = ["rm", "score", "--model", str(model), "--data", str(files / "pairs.jsonl")]
        argv += ["--output", str(model / "scores.jsonl")]
    else:
        argv = train_argv(files, model, command=tuple(command.split()))
    argv[argv.index("--model" if command != "eval" else "--policy") + 1] = str(model)
    refused(capsys, argv, str(model), "the input", "a run never writes where it reads")
    assert snapshot(model) == before


def test_rm_score_refuses_to_write_its_scores_over_its_data(files, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    shutil.copy(files / "pairs.jsonl", data)
    before = data.read_bytes()
    argv = ["rm", "score", "--model", str(files / "model"), "--data", str(data), "--output", str(data)]
    refused(capsys, argv, f"--output: {data} is the input --data")
    assert data.read_bytes() == before


@pytest.mark.parametrize("command", ["train", "online", "eval"])
def test_an_output_folder_holding_the_data_it_reads_is_refused(files, tmp_path, capsys, command):
    output = tmp_path / "out"
    output.mkdir()
    for name in ("pairs.jsonl", "prompts.jsonl"):
        shutil.copy(files / name, output / name)
    before = snapshot(output)
    if command == "train":
        argv = train_argv(files, output)
        argv[argv.index("--data") + 1] = str(output / "pairs.jsonl")
    elif command == "online":
        argv = sampling_argv("online", files, output)
        argv[argv.index("--prompts") + 1] = str(output / "prompts.jsonl")
    else:
        argv = eval_argv(files, output, data=output / "pairs.jsonl")
    refused(capsys, argv, f"{output} contains the input")
    assert snapshot(output) == before


# --------------------------------------------------------------------------- outputs checked before any work


def _no_model_loads(monkeypatch):
    """Loading a model fails the test: the refusal must come before any work."""
    import preftune.evaluation.run as run_module
    import preftune.generation.scoring as scoring
    import preftune.recipes.online as online

    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the output was checked")

    monkeypatch.setattr(scoring.RewardModelScorer, "__init__", loaded)
    monkeypatch.setattr(run_module, "load_tokenizer", loaded)
    monkeypatch.setattr(online, "read_prompts", loaded)


def test_rm_score_into_an_existing_folder_is_refused_before_scoring_and_leaves_nothing(
    files, tmp_path, capsys, monkeypatch
):
    _no_model_loads(monkeypatch)
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    argv = ["rm", "score", "--model", str(files / "model"), "--data", str(files / "pairs.jsonl")]
    refused(capsys, [*argv, "--output", str(folder)], f"--output: {folder} is a folder")
    assert snapshot(folder) == {"keep.txt": b"mine"}
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.parametrize("command", ["rm score", "eval", "online"])
def test_a_read_only_output_folder_is_refused_up_front(files, tmp_path, capsys, monkeypatch, command):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        outputs.os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode)
    )
    _no_model_loads(monkeypatch)
    if command == "rm score":
        argv = ["rm", "score", "--model", str(files / "model"), "--data", str(files / "pairs.jsonl")]
        argv += ["--output", str(read_only / "scores.jsonl")]
    elif command == "eval":
        argv = eval_argv(files, read_only / "eval")
    else:
        argv = sampling_argv("online", files, read_only / "online")
    refused(capsys, argv, "cannot be written (read-only or no permission on", str(read_only))
    assert not list(read_only.iterdir())


# --------------------------------------------------------------------------- one run per folder


SLOW_STEPS = (
    "import time, preftune.engine.steps as s; step = s.ExampleSteps.step; "
    "s.ExampleSteps.step = lambda self, *a: (time.sleep(0.2), step(self, *a))[1]; "
)
"""Steps of a fifth of a second, so that a run is still running when a second one starts."""


def _launch(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = SLOW_STEPS + "import preftune.cli, sys; sys.exit(preftune.cli.main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _wait_for(process: subprocess.Popen[str], prefix: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith(prefix):
            return
    pytest.fail(f"the run ended before printing {prefix!r}")


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_ends_as_if_alone(files, tmp_path, capsys):
    output = tmp_path / "out"
    argv = train_argv(files, output, "--set", "train.max_steps=40", "--set", "train.log_every=1")
    first = _launch([*argv, "--set", "train.progress=true"])  # no terminal: a line per step
    try:
        _wait_for(first, "step 1/")
        refused(capsys, argv, f"train.output_dir: {output} is in use by another run (pid {first.pid} on")
        refused(capsys, [*argv, "--resume"], "is in use by another run")
        assert first.poll() is None  # the refusals came while it ran
        assert first.wait(timeout=600) == 0
    finally:
        first.kill()
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert not (output / outputs.LOCK_FILE).exists()  # released at the end


def test_a_lock_left_by_a_killed_run_is_taken_over(files, tmp_path):
    output = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from preftune.data.outputs import "
         "FolderLock; FolderLock(Path(sys.argv[1]), 'train', 'k').acquire(); print('held', flush=True); "
         "time.sleep(600)", str(output)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (output / outputs.LOCK_FILE).exists()  # what kill -9 leaves
    assert main(train_argv(files, output)) == 0
    assert not (output / outputs.LOCK_FILE).exists()


def test_without_file_locks_the_pid_and_host_in_the_lock_decide(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(outputs, "_flock", lambda fd: None)  # a file system that takes no locks
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    for pid, taken in ((int(dead.stdout), True), (os.getppid(), False)):
        (folder / outputs.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        lock = outputs.FolderLock(folder, "train", "train.output_dir")
        if taken:
            lock.acquire().release()
        else:
            with pytest.raises(ConfigError, match=f"in use by another run \\(pid {pid} on"):
                lock.acquire()


def test_a_run_that_fails_after_taking_its_folder_leaves_neither_lock_nor_folder(files, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(files / "model", broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    output = tmp_path / "out"
    argv = train_argv(files, output)
    argv[argv.index("--model") + 1] = str(broken)
    assert main(argv) != 0
    assert not output.exists() and outputs.held() == []


# --------------------------------------------------------------------------- pipeline stages stay inside


def _pipeline_file(tmp_path: Path, files: Path, stage_name: str) -> Path:
    stage = {"kind": "dpo", "model": {"name_or_path": str(files / "model")}, "data": {"path": str(files / "pairs.jsonl")},
             "train": {"max_steps": 1, "batch_size": 4, "progress": False, "report_to": ["none"]}}  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "p" / "out"), "stages": {stage_name: stage}}))
    return path


@pytest.mark.parametrize("form", ["climbing", "absolute"])
def test_a_stage_name_that_is_not_a_plain_folder_name_is_refused_and_the_run_it_names_is_unchanged(
    files, train_run, tmp_path, capsys, form
):
    victim = tmp_path / "victim_run"
    shutil.copytree(train_run, victim)
    name = "../../victim_run" if form == "climbing" else str(victim)
    before = snapshot(victim)
    path = _pipeline_file(tmp_path, files, name)
    refused(capsys, ["pipeline", "run", str(path)], f"stages.{name}: a stage name is a plain folder name")
    assert snapshot(victim) == before
    assert not (tmp_path / "p").exists()


def test_a_stage_folder_that_links_outside_the_output_is_refused_and_its_target_is_unchanged(
    files, train_run, tmp_path, capsys
):
    victim = tmp_path / "victim_run"
    shutil.copytree(train_run, victim)
    before = snapshot(victim)
    path = _pipeline_file(tmp_path, files, "dpo")
    (tmp_path / "p" / "out").mkdir(parents=True)
    (tmp_path / "p" / "out" / "dpo").symlink_to(victim)
    refused(capsys, ["pipeline", "run", str(path)], "stages.dpo:", "leads outside the pipeline's output")
    assert snapshot(victim) == before
