"""The console a TRL user knows: the keys the run was given first, then per logged step the
metrics TRL logs under their names, on the progress bar and in the plain line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import QUIET_FLAGS, write_train_inputs

from preftune.cli import main

QUIET = QUIET_FLAGS


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> Path:
    return write_train_inputs(tmp_path_factory.mktemp("inputs"), tokenizer)


def argv(files: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(files / "model"), "--data", str(files / "pairs.jsonl"), "--output",
            str(output), "--set", "train.batch_size=4", "--set", "train.max_steps=6", "--set", "train.log_every=1",
            "--set", "train.save_every=null", "--set", "train.learning_rate=1e-3", *QUIET, *extra]  # fmt: skip


def test_the_step_line_shows_what_trl_users_look_at(files, tmp_path, capsys):
    capsys.readouterr()
    assert main([*argv(files, tmp_path / "out"), "--set", "train.progress=true"]) == 0  # no terminal: lines
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 3/6 "))
    names = line.split()[2::2]
    assert names[:6] == [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "learning_rate",
        "grad_norm",
        "epoch",
    ]
    assert dict(zip(names, line.split()[3::2], strict=False))["epoch"] == "0.75"


def test_the_progress_bar_shows_the_same_values(files, tmp_path, monkeypatch):
    import preftune.engine.harness as harness

    shown: list[dict[str, str]] = []

    class Bar:
        disable = False

        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            pass

        def set_postfix(self, values):
            shown.append(dict(values))

        def close(self):
            pass

    monkeypatch.setattr(harness, "tqdm", Bar)
    assert main([*argv(files, tmp_path / "out"), "--set", "train.progress=true"]) == 0
    assert list(shown[0]) == [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "learning_rate",
        "grad_norm",
        "epoch",
    ]


def test_a_run_first_prints_the_keys_the_user_set_with_their_values(files, tmp_path, capsys):
    capsys.readouterr()
    assert main([*argv(files, tmp_path / "out"), "--loss", "ipo", "--set", "objective.beta=0.25"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config (every key not at its default")
    block = out[1 : out.index(next(line for line in out[1:] if not line.startswith("  ")))]
    assert f"  model.name_or_path: {files / 'model'}" in block
    assert "  objective.loss: [ipo]" in block and "  objective.beta: 0.25" in block
    assert "  train.learning_rate: 0.001" in block and "  train.save_every: null" in block
    assert not [line for line in block if line.startswith("  train.adam_beta1")]  # left at its default


def test_a_pipeline_prints_each_stages_keys_as_written_instead_of_the_runs_own_block(files, tmp_path, capsys):
    import yaml

    stage = {"kind": "simpo", "model": {"name_or_path": str(files / "model")}, "data": {"path": str(files / "pairs.jsonl")},
             "train": {"max_steps": 1, "batch_size": 4, "progress": False, "report_to": ["none"]}}  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump({"output": str(tmp_path / "out"), "stages": {"prefer": stage}}, sort_keys=False)
    )
    capsys.readouterr()
    assert main(["pipeline", "run", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"pipeline: prefer (dpo) running in {tmp_path / 'out' / 'prefer'}"
    assert out[1:4] == [f"  model.name_or_path: {files / 'model'}", f"  data.path: {files / 'pairs.jsonl'}",
                        "  train.max_steps: 1"]  # fmt: skip
    assert "  objective.loss: [simpo]" in out and not [line for line in out if line.startswith("config (")]
