"""Checkpoints as Hugging Face tools expect them (``checkpoint-N``, HF's ``trainer_state.json``),
``--resume`` to the latest or to a named checkpoint, a Trainer's checkpoint refused with the way to
start from its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import QUIET_FLAGS, write_train_inputs
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

from preftune.cli import main
from preftune.experiments.synthetic import tiny_llama

QUIET = QUIET_FLAGS


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> Path:
    return write_train_inputs(tmp_path_factory.mktemp("inputs"), tokenizer)


def argv(files: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(files / "model"), "--data", str(files / "pairs.jsonl"), "--output",
            str(output), "--set", "train.batch_size=4", "--set", "train.max_steps=6", "--set", "train.save_every=2",
            "--set", "train.save_total_limit=null", "--set", "train.log_every=1",
            "--set", "train.learning_rate=1e-3", *QUIET, *extra]  # fmt: skip


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def full(files, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run, a checkpoint every 2 steps, all kept."""
    output = tmp_path_factory.mktemp("runs") / "full"
    assert main(argv(files, output)) == 0
    return output


# --------------------------------------------------------------------------- checkpoints as HF tools expect


def test_checkpoints_are_named_checkpoint_n_as_hugging_face_tools_name_them(full):
    assert sorted(p.name for p in full.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert get_last_checkpoint(str(full)) == str(full / "checkpoint-6")


def test_trainer_state_json_is_the_hugging_face_trainers_schema_and_loads_as_its_state(full):
    state = TrainerState.load_from_json(str(full / "checkpoint-4" / "trainer_state.json"))
    assert (state.global_step, state.max_steps, state.logging_steps, state.save_steps) == (4, 6, 1, 2)
    assert state.train_batch_size == 4 and state.epoch == pytest.approx(4 * 4 / 16)
    assert [row["step"] for row in state.log_history] == [1, 2, 3, 4]
    assert [row["loss"] for row in state.log_history] == [losses(full)[step] for step in (1, 2, 3, 4)]
    assert json.loads((full / "checkpoint-4" / "preftune_state.json").read_text())["step"] == 4


# --------------------------------------------------------------------------- --resume PATH


def test_resume_from_a_named_checkpoint_reproduces_the_uninterrupted_losses_from_that_step(
    files, full, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    capsys.readouterr()
    assert main(argv(files, run, "--resume", str(run / "checkpoint-2"), "--set", "train.overwrite=true")) == 0
    assert f"resumed from {run / 'checkpoint-2'} at step 2" in capsys.readouterr().out
    assert losses(run) == losses(full)  # steps 1-2 kept, 3-6 trained again: the same losses
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]


def test_resume_from_an_earlier_checkpoint_refuses_to_replace_the_later_ones_unless_asked(
    files, full, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(argv(files, run, "--resume", str(run / "checkpoint-2"))) == 2
    line = error_line(capsys)
    assert (
        "holds checkpoint-4, checkpoint-6, final after checkpoint-2" in line
        and "train.overwrite=true" in line
    )
    assert {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_from_another_runs_checkpoint_continues_into_a_new_folder(files, full, tmp_path):
    fork = tmp_path / "fork"
    assert main(argv(files, fork, "--resume", str(full / "checkpoint-4"))) == 0
    assert losses(fork) == {step: loss for step, loss in losses(full).items() if step > 4}


def test_a_checkpoint_with_the_old_seven_digit_name_still_resumes_to_the_uninterrupted_losses(
    files, full, tmp_path, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    old = run / "checkpoint-0000002"
    shutil.copytree(full / "checkpoint-2", old)
    (old / "preftune_state.json").rename(old / "trainer_state.json")  # the old layout: preftune's keys there
    (run / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (full / "metrics.jsonl").read_text().splitlines()[:2])
    )
    capsys.readouterr()
    assert main(argv(files, run, "--resume")) == 0
    assert f"resumed from {old} at step 2" in capsys.readouterr().out
    assert losses(run) == losses(full)


def test_resuming_a_hugging_face_trainer_checkpoint_is_refused_offering_to_start_from_its_weights(
    files, tmp_path, capsys
):
    trl = tmp_path / "trl-run" / "checkpoint-500"
    shutil.copytree(files / "model", trl)
    (trl / "training_args.bin").write_bytes(b"TRL's arguments")
    (trl / "rng_state.pth").write_bytes(b"rng")
    (trl / "trainer_state.json").write_text(json.dumps({"global_step": 500, "log_history": []}))
    output = tmp_path / "out"
    assert main(argv(files, output, "--resume", str(trl))) == 2
    line = error_line(capsys)
    assert f"{trl}: a checkpoint written by the Hugging Face Trainer (TRL)" in line
    assert f"Start a new run from its weights instead: --model {trl}" in line
    assert not output.exists()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing", "no such checkpoint folder"),
        ("run", "is not a complete preftune checkpoint (it holds checkpoint-2"),
    ],
)
def test_resume_naming_what_is_not_a_checkpoint_is_refused_naming_it(
    files, full, tmp_path, capsys, name, expected
):
    target = tmp_path / "missing" if name == "missing" else full
    assert main(argv(files, tmp_path / "out", "--resume", str(target))) == 2
    assert expected in error_line(capsys)


def test_trainer_state_json_stays_strict_json_when_a_logged_value_is_not_finite(tmp_path, tokenizer):
    import torch

    from preftune.engine.checkpoint import CheckpointContents, save_checkpoint

    model = tiny_llama(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = [{"step": 1, "loss": 0.5, "grad_norm": float("nan")}]
    contents = CheckpointContents(
        model, tokenizer, optimizer, scheduler, {}, trainer_state={"log_history": history}
    )
    path = save_checkpoint(tmp_path, 1, contents)
    text = (path / "trainer_state.json").read_text()
    state = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in trainer_state.json"))
    assert state["log_history"] == [{"step": 1, "loss": 0.5, "grad_norm": None}]
