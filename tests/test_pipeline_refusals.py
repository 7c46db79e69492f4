"""A pipeline file is refused whole, before its first stage runs, when any of it is wrong: a key
written twice, an alias bomb, a typo in any stage. A stage reruns exactly when something it reads
changed: the files of its input folders, or a stage it references with ``${NAME.…}``. What a
pipeline says to do after a stop is what to do in a pipeline.

Each refusal runs the command line as a user would and checks the exit code, the one line it
prints (file, line and key), that nothing was written and that the inputs are unchanged. The
rerun tests replace the stages' training with a stand-in that writes a ``final/`` folder: what
they test is the pipeline's own bookkeeping, which decides before any stage trains."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

import preftune.recipes.pipeline as pipeline
from preftune.cli import main
from preftune.engine.guard import NONFINITE_REMEDY, RESUME, NonFiniteError, StopRequested

FAST = {"max_steps": 1, "batch_size": 4, "progress": False, "report_to": ["none"]}
GOOD = {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"}


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A model folder (its files only: no stage here loads it) and a data file."""
    folder = tmp_path / "inputs"
    (folder / "base" / "tokenizer").mkdir(parents=True)
    (folder / "base" / "config.json").write_text("{}")
    (folder / "base" / "model.safetensors").write_bytes(b"weights-1")
    (folder / "base" / "tokenizer" / "vocab.json").write_text("{}")
    (folder / "prefs.jsonl").write_text(json.dumps(GOOD) + "\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stage(inputs: Path, **sections) -> dict:
    return {"model": {"name_or_path": str(inputs / "base")}, "data": {"path": str(inputs / "prefs.jsonl")},
            "train": dict(FAST), **sections}  # fmt: skip


def write(tmp_path: Path, stages: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}, sort_keys=False))
    return path


def line_of(path: Path, text: str) -> int:
    """The first line of the file that holds ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def refused(capsys, path: Path, inputs: Path, *expected: str) -> str:
    """``pipeline run`` exits 2 with one line, writes nothing, and leaves its file and inputs as they were."""
    before, files = path.read_bytes(), snapshot(inputs)
    assert main(["pipeline", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: "), err
    for text in expected:
        assert text in err[0], err[0]
    assert not (path.parent / "out").exists()
    assert path.read_bytes() == before and snapshot(inputs) == files
    return err[0]


@pytest.fixture
def stand_in(monkeypatch) -> list[str]:
    """Every stage kind trains nothing: it writes a new ``final/`` (new weights) and returns a
    loss. Returns the names of the stages that ran, in order."""
    ran: list[str] = []

    def run(config, tree, folder: Path) -> dict[str, float]:
        ran.append(folder.name)
        (folder / "final").mkdir(exist_ok=True)
        (folder / "final" / "model.safetensors").write_bytes(os.urandom(16))
        return {"loss": 0.5}

    for kind in pipeline.KINDS:
        monkeypatch.setitem(pipeline.KINDS, kind, run)
    return ran


def statuses(path: Path) -> list[str]:
    return [row["status"] for row in pipeline.run_pipeline(path, say=lambda *_: None)["stages"]]


# --------------------------------------------------------------------------- the file, whole


def test_two_stages_of_one_name_are_refused_naming_the_file_both_lines_and_the_stage(
    tmp_path, inputs, capsys
):
    body = f"    model: {{name_or_path: {inputs / 'base'}}}\n    data: {{path: {inputs / 'prefs.jsonl'}}}\n"
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\nstages:\n  sft:\n{body}  rm:\n{body}  sft:\n{body}")
    refused(capsys, path, inputs, "pipeline.yaml:9: duplicate key 'stages.sft' (first on line 3)")


def test_a_key_written_twice_in_a_stage_is_refused_naming_the_file_the_line_and_the_key(
    tmp_path, inputs, capsys
):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"output: {tmp_path / 'out'}\nstages:\n  sft:\n    model: {{name_or_path: {inputs / 'base'}}}\n"
        f"    train:\n      learning_rate: 1.0e-5\n    data: {{path: {inputs / 'prefs.jsonl'}}}\n"
        "    train:\n      max_steps: 3\n"
    )
    refused(capsys, path, inputs, "pipeline.yaml:8: duplicate key 'stages.sft.train' (first on line 5)")


def test_an_alias_bomb_in_a_pipeline_file_is_refused_at_once(tmp_path, inputs, capsys):
    lines = ["    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    - &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"output: {tmp_path / 'out'}\nstages:\n  sft:\n    model: {{name_or_path: {inputs / 'base'}}}\n"
        "    tags:\n" + "\n".join(lines) + "\n"
    )
    started = time.perf_counter()
    refused(
        capsys, path, inputs, "pipeline.yaml:11: stages.sft.tags[5]: its aliases expand to more than 100000"
    )
    assert time.perf_counter() - started < 5


CASES = [
    ("unknown-key", "dpo", {"train": {**FAST, "learning_rat": 1e-5}}, "learning_rat:",
     "stages.dpo: unknown key 'train.learning_rat' (did you mean 'learning_rate'?)"),
    ("bad-value", "dpo", {"train": {**FAST, "batch_size": 0}}, "batch_size: 0",
     "stages.dpo: train.batch_size: must be"),
    ("key-another-command-reads", "rm", {"objective": {"beta": 0.2}}, "beta: 0.2",
     "stages.rm: objective.beta is read by"),
    ("unknown-objective", "dpo", {"objective": {"loss": ["dpoo"]}}, "loss:",
     "stages.dpo: objective.loss: unknown objective 'dpoo'"),
    ("train-key-in-an-eval-stage", "eval", {"train": {"batch_size": 2}}, "batch_size: 2",
     "stages.eval: train.batch_size is read by"),
]  # fmt: skip


@pytest.mark.parametrize("name, late, change, where, expected", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_in_a_later_stage_is_refused_before_the_first_stage_runs(
    tmp_path, inputs, capsys, name, late, change, where, expected
):
    stages = {
        "sft": stage(inputs),
        "rm": stage(inputs),
        "dpo": stage(inputs, model={"name_or_path": "${sft.final}"}),
    }
    stages["eval"] = {"policy": "${dpo.final}", "sets": {"id": str(inputs / "prefs.jsonl")}}
    stages[late].update(change)
    path = write(tmp_path, stages)
    refused(capsys, path, inputs, f"pipeline.yaml:{line_of(path, where)}: {expected}")


# --------------------------------------------------------------------------- what makes a stage rerun


@pytest.mark.parametrize("change", ["replaced weights", "an added file", "a replaced file in a sub-folder"])
def test_a_changed_file_in_a_stages_input_folder_runs_the_stage_again(tmp_path, inputs, stand_in, change):
    path = write(tmp_path, {"dpo": stage(inputs)})
    assert statuses(path) == ["ran"]
    assert statuses(path) == ["skipped"]
    target = {
        "replaced weights": inputs / "base" / "model.safetensors",
        "an added file": inputs / "base" / "adapter_model.safetensors",
        "a replaced file in a sub-folder": inputs / "base" / "tokenizer" / "vocab.json",
    }[change]
    mtime = target.stat().st_mtime_ns if target.exists() else time.time_ns()
    target.write_bytes(b"weights-2")  # the same size as weights-1
    os.utime(target, ns=(mtime + 10**9, mtime + 10**9))  # written a second later, as a user would
    assert statuses(path) == ["ran"]
    assert statuses(path) == ["skipped"]


def test_a_stage_reruns_after_the_stages_it_references_and_no_others(tmp_path, inputs, stand_in):
    """dpo's ``warmup_steps`` holds the name "rm" but reads nothing of rm; more reads dpo's final."""
    stages = {
        "rm": stage(inputs, kind="rm"),
        "dpo": stage(inputs, train={**FAST, "warmup_steps": 1}),
        "more": stage(inputs, kind="simpo", model={"name_or_path": "${dpo.final}"}),
    }
    path = write(tmp_path, stages)
    assert statuses(path) == ["ran", "ran", "ran"]
    stages["rm"]["train"]["learning_rate"] = 2e-5
    write(tmp_path, stages)
    assert statuses(path) == ["ran", "skipped", "skipped"]
    stages["dpo"]["train"]["learning_rate"] = 2e-5
    write(tmp_path, stages)
    assert statuses(path) == ["skipped", "ran", "ran"]
    assert stand_in == ["rm", "dpo", "more", "rm", "dpo", "more"]


# --------------------------------------------------------------------------- what a pipeline says to do


def _stopped(problem):
    def raise_(config, tree, folder):
        raise problem

    return raise_


STOPS = [
    ("signal", StopRequested("stopped by SIGTERM after step 3; saved checkpoint-3", 143, RESUME), 143,
     "stage dpo: stopped by SIGTERM after step 3; saved checkpoint-3; run `preftune pipeline run"),
    ("ctrl-c-while-loading", KeyboardInterrupt(), 130, "stage dpo: interrupted; run `preftune pipeline run"),
    ("not-finite", NonFiniteError("step 2: the loss (nan) is not finite", NONFINITE_REMEDY), 2,
     "stage dpo: step 2: the loss (nan) is not finite. Change stages.dpo.train in"),
]  # fmt: skip


@pytest.mark.parametrize("name, problem, code, expected", STOPS, ids=[s[0] for s in STOPS])
def test_a_stopped_stage_says_what_to_do_in_the_pipeline_and_doing_it_works(
    tmp_path, inputs, capsys, monkeypatch, stand_in, name, problem, code, expected
):
    path = write(tmp_path, {"rm": stage(inputs, kind="rm"), "dpo": stage(inputs)})
    run = pipeline.KINDS["dpo"]
    monkeypatch.setitem(pipeline.KINDS, "dpo", _stopped(problem))
    assert main(["pipeline", "run", str(path)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert f"`preftune pipeline run {path}` again" in err[0] and "--resume" not in err[0]
    monkeypatch.setitem(pipeline.KINDS, "dpo", run)
    if name == "not-finite":  # the advice: change the stage's train section; the stage starts over
        write(
            tmp_path,
            {"rm": stage(inputs, kind="rm"), "dpo": stage(inputs, train={**FAST, "max_grad_norm": 1.0})},
        )
        assert statuses(path) == ["skipped", "ran"]
    else:  # the advice: the same command again; the stage resumes
        assert statuses(path) == ["skipped", "resumed"]


def test_a_stage_folder_holding_another_kind_of_run_says_what_to_do_in_the_pipeline(tmp_path, inputs, capsys):
    path = write(tmp_path, {"dpo": stage(inputs)})
    (tmp_path / "out" / "dpo").mkdir(parents=True)
    (tmp_path / "out" / "dpo" / "run.json").write_text('{"kind": "online"}\n')
    before = snapshot(tmp_path / "out")
    assert main(["pipeline", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.dpo:" in err[0] and "give the stage another name" in err[0], err
    assert "--resume" not in err[0]
    assert snapshot(tmp_path / "out") == before
