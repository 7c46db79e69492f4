"""Specification of the ``preftune`` command line, run in-process through ``preftune.cli.main``.

Training runs use a tiny local Llama and tokenizer saved to disk, and a small JSONL file:
no hub, no network. User errors exit with status 2 and one ``preftune: error: ...`` line.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import helpers
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import preftune.recipes.dpo
from preftune.cli import main
from preftune.experiments.synthetic import NEGATIVE, POSITIVE, TOPICS, tiny_llama

TRL_METRICS = {*helpers.TRL_METRICS, *helpers.THROUGHPUT_METRICS}
QUIET = ["--set", "train.progress=false", "--set", "train.report_to=none"]


def pair_records(n: int = 8, seed: int = 0) -> list[dict[str, str]]:
    """Distinct pairs of varying length, so that which pairs a step sees changes its loss."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        chosen = " ".join(rng.choice(POSITIVE) for _ in range(2 + i % 4))
        rejected = " ".join(rng.choice(NEGATIVE) for _ in range(1 + (i * 3) % 5))
        records.append(
            {
                "prompt": f"review of the {TOPICS[i % len(TOPICS)]}:",
                "chosen": f" {chosen}",
                "rejected": f" {rejected}",
            }
        )
    return records


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_metrics(output: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama and its tokenizer, saved as a local ``from_pretrained`` folder."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer.save_pretrained(path)
    tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pair_records())


@pytest.fixture(scope="module")
def dpo_run(model_dir, pairs_file, tmp_path_factory):
    """One 2-step DPO run, exactly as a user types it; shared by the tests that inspect it."""
    output = tmp_path_factory.mktemp("dpo") / "out"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(pairs_file),
        "--loss",
        "dpo",
        "--output",
        str(output),
        "--set",
        "train.max_steps=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.progress=false",
    ]
    code = main(argv)
    return code, output


def train_argv(model_dir: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), *QUIET, *extra]


def error_line(capsys) -> str:
    """The single line a user error prints to stderr; there must be no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("preftune: error: ")
    return lines[0]


# --------------------------------------------------------------------------- preftune losses


def test_losses_lists_the_registered_objectives_and_presets(capsys):
    assert main(["losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines if not line.startswith(("aliases:", "option "))}
    assert {"sigmoid", "ipo", "dpop", "simpo", "orpo", "rpo"} <= names
    by_name = {line.split()[0]: line for line in lines}
    assert "[reference]" in by_name["sigmoid"]
    assert "[reference-free" in by_name["simpo"]
    assert "[preset]" in by_name["rpo"]
    assert "sigmoid" in by_name["rpo"] and "sft" in by_name["rpo"]


def test_losses_shows_every_objective_with_its_reference_need_parameters_and_paper(capsys):
    from preftune.losses import OPTIONS, PRESETS, REGISTRY

    assert main(["losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines}
    assert set(REGISTRY) | set(PRESETS) <= set(by_name)
    for name, spec in REGISTRY.items():
        line = by_name[name]
        assert ("[reference" if spec.needs_reference else "[reference-free") in line, name
        params = line[line.index("(beta=") : line.index(")")]
        assert all(p in params for p in spec.uses), name
        assert "arXiv" in line or name in ("sft", "sigmoid_norm"), name
    for option in OPTIONS:
        assert any(line.startswith(f"option {option}:") and "arXiv" in line for line in lines), option


def test_losses_lists_the_unpaired_objectives_with_what_they_read(capsys):
    assert main(["losses"]) == 0
    kto = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("kto "))
    assert "[reference, unpaired, KL per micro-batch] (beta=0.1, desirable_weight, undesirable_weight)" in kto
    assert "arXiv 2402.01306" in kto


def test_losses_lists_the_aliases(capsys):
    assert main(["losses"]) == 0
    aliases = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("aliases:"))
    assert "dpo -> sigmoid" in aliases


# --------------------------------------------------------------------------- preftune train


def test_train_exits_zero_and_logs_trl_metric_names(dpo_run):
    code, output = dpo_run
    assert code == 0
    records = read_metrics(output)
    assert [r["step"] for r in records] == [2]  # log_every=10: the last step is always logged
    assert set(records[0]) >= TRL_METRICS
    assert all(math.isfinite(records[0][name]) for name in TRL_METRICS)
    assert records[0]["loss"] > 0


def test_train_saves_a_final_model_that_transformers_loads(dpo_run, model_dir):
    code, output = dpo_run
    assert code == 0
    final = AutoModelForCausalLM.from_pretrained(output / "final")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    assert final.config.vocab_size == start.config.vocab_size
    trained = dict(final.named_parameters())
    # The saved weights are the trained policy, not the starting model.
    assert any(not torch.equal(p, trained[n]) for n, p in start.named_parameters())
    assert len(AutoTokenizer.from_pretrained(output / "final")) == start.config.vocab_size


def test_train_writes_the_resolved_config_next_to_the_metrics(dpo_run, model_dir):
    _, output = dpo_run
    saved = json.loads((output / "config.json").read_text())
    assert saved["model"]["name_or_path"] == str(model_dir)
    assert saved["objective"]["loss"] == ["dpo"]
    assert saved["train"]["max_steps"] == 2
    assert saved["train"]["batch_size"] == 4


def test_train_with_a_reference_free_objective_builds_no_reference(model_dir, pairs_file, tmp_path, capsys):
    output = tmp_path / "out"
    argv = train_argv(model_dir, pairs_file, output, "--loss", "simpo", "--set", "train.max_steps=2")
    assert main(argv) == 0
    assert "objective: simpo, beta=2.0; reference: none" in capsys.readouterr().out
    records = read_metrics(output)
    assert records[-1]["step"] == 2
    assert {"rewards/chosen", "rewards/accuracies", "logps/chosen"} <= set(records[-1])
    assert (output / "final" / "config.json").is_file()


def test_train_with_kto_trains_on_unpaired_records(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", helpers.unpaired_records(4))
    output = tmp_path / "out"
    settings = ["--set", "train.max_steps=1", "--set", "train.batch_size=4"]
    assert main(train_argv(model_dir, data, output, "--loss", "kto", *settings)) == 0
    out = capsys.readouterr().out
    assert "data: 4/4 examples kept (2 desirable, 2 undesirable) from 4 records" in out
    assert "objective: kto, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0; reference: copy" in out
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(
        read_metrics(output)[-1]
    )


def test_check_data_for_kto_reports_every_bad_unpaired_record(tmp_path, capsys):
    records = [*helpers.unpaired_records(2), {"prompt": "Q:", "completion": " yes", "label": "maybe"}]
    data = write_jsonl(tmp_path / "kto.jsonl", [*records, {"prompt": "Q:", "answer": " yes"}])
    assert main(["check-data", str(data), "--set", "objective.loss=kto"]) == 2
    captured = capsys.readouterr()
    assert f"{data}: 4 records, 2 examples (0 from pairs)" in captured.out
    assert "preftune: error: 2 bad records:" in captured.err
    assert (
        f"{data}:3: field 'label' must be true (desirable) or false (undesirable), got 'maybe'"
        in captured.err
    )


# --------------------------------------------------------------------------- user errors


def test_malformed_jsonl_line_exits_2_naming_file_and_line(model_dir, tmp_path, capsys):
    lines = [json.dumps(r) for r in pair_records(4)]
    lines[2] = '{"prompt": "a", "chosen": " b", "rejected": '
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(train_argv(model_dir, data, tmp_path / "out")) == 2
    assert error_line(capsys).startswith(f"preftune: error: {data}:3: malformed JSON")


def test_config_error_exits_2_before_any_model_loads(pairs_file, tmp_path, capsys):
    missing_model = tmp_path / "no-such-model"
    argv = train_argv(missing_model, pairs_file, tmp_path / "out", "--set", "train.batch_siz=2")
    assert main(argv) == 2
    line = error_line(capsys)
    assert "train.batch_siz" in line
    assert "did you mean 'batch_size'" in line
    assert "name_or_path" not in line and str(missing_model) not in line


def test_unknown_loss_exits_2_with_a_suggestion(model_dir, pairs_file, tmp_path, capsys):
    assert main(train_argv(model_dir, pairs_file, tmp_path / "out", "--loss", "sigmod")) == 2
    line = error_line(capsys)
    assert "objective.loss" in line
    assert "did you mean 'sigmoid'" in line
    assert not (tmp_path / "out").exists()


def test_nonexistent_model_path_exits_2_naming_the_key(pairs_file, tmp_path, capsys):
    missing_model = tmp_path / "no-such-model"
    assert main(train_argv(missing_model, pairs_file, tmp_path / "out")) == 2
    line = error_line(capsys)
    assert "model.name_or_path" in line
    assert str(missing_model) in line


def test_missing_model_option_exits_2(pairs_file, tmp_path, capsys):
    assert main(["train", "--data", str(pairs_file), "--output", str(tmp_path / "out")]) == 2
    assert "model.name_or_path: required" in error_line(capsys)


def test_missing_data_option_exits_2(model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(model_dir), "--output", str(tmp_path / "out")]) == 2
    assert "data.path: required" in error_line(capsys)


def test_missing_config_file_exits_2_naming_it(tmp_path, capsys):
    config = tmp_path / "absent.yaml"
    assert main(["train", "--config", str(config)]) == 2
    line = error_line(capsys)
    assert str(config) in line
    assert "no such config file" in line


def test_interrupt_exits_130_and_suggests_resume(model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    def interrupted(config, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preftune.recipes.dpo, "train", interrupted)
    assert main(train_argv(model_dir, pairs_file, tmp_path / "out")) == 130
    assert "--resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- --resume


def test_resume_continues_from_the_latest_checkpoint_as_if_never_interrupted(
    model_dir, pairs_file, tmp_path, capsys
):
    settings = ["--loss", "dpo", "--set", "train.batch_size=2", "--set", "train.max_steps=4"]
    settings += ["--set", "train.save_every=1", "--set", "train.log_every=1"]

    # The uninterrupted run: 4 steps of 2 pairs, a checkpoint after each (the limit keeps the last 2).
    full = tmp_path / "full"
    assert main(train_argv(model_dir, pairs_file, full, *settings, "--set", "train.save_total_limit=3")) == 0
    assert sorted(p.name for p in full.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-3",
        "checkpoint-4",
    ]
    expected = read_metrics(full)
    assert [r["step"] for r in expected] == [1, 2, 3, 4]

    # A run interrupted after step 2: its output folder holds only that checkpoint.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    capsys.readouterr()
    assert main(train_argv(model_dir, pairs_file, resumed, *settings, "--resume")) == 0
    assert "at step 2" in capsys.readouterr().out

    got = read_metrics(resumed)
    assert [r["step"] for r in got] == [3, 4]
    # Same weights, optimizer, schedule and data position: the same steps as the full run.
    for name in ("loss", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm"):
        assert [r[name] for r in got] == pytest.approx([r[name] for r in expected[2:]], rel=1e-5), name
    assert (resumed / "final" / "config.json").is_file()


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_runs_checkpoints(
    model_dir, pairs_file, tmp_path, capsys
):
    settings = ["--loss", "simpo", "--set", "train.batch_size=4", "--set", "train.max_steps=2"]
    settings += ["--set", "train.save_every=1", "--set", "train.log_every=1"]
    output = tmp_path / "out"
    assert main(train_argv(model_dir, pairs_file, output, *settings)) == 0
    before = (output / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(train_argv(model_dir, pairs_file, output, *settings)) == 2
    line = error_line(capsys)
    assert "holds an earlier run (checkpoint-2)" in line and "--resume" in line and "train.overwrite" in line
    assert (output / "metrics.jsonl").read_text() == before


def test_overwrite_starts_over_in_a_folder_holding_checkpoints(model_dir, pairs_file, tmp_path):
    settings = ["--loss", "simpo", "--set", "train.batch_size=4", "--set", "train.max_steps=2"]
    settings += ["--set", "train.save_every=1", "--set", "train.log_every=1"]
    output = tmp_path / "out"
    assert main(train_argv(model_dir, pairs_file, output, *settings)) == 0
    assert main(train_argv(model_dir, pairs_file, output, *settings, "--set", "train.overwrite=true")) == 0
    assert [r["step"] for r in read_metrics(output)] == [1, 2]


def test_overwrite_also_removes_the_earlier_runs_final_folder(model_dir, pairs_file, tmp_path):
    settings = ["--loss", "simpo", "--set", "train.batch_size=4", "--set", "train.max_steps=2"]
    settings += ["--set", "train.save_every=1"]
    output = tmp_path / "out"
    assert main(train_argv(model_dir, pairs_file, output, *settings)) == 0
    (output / "final" / "marker").write_text("earlier run")
    assert main(train_argv(model_dir, pairs_file, output, *settings, "--set", "train.overwrite=true")) == 0
    assert not (output / "final" / "marker").exists()


def test_overwrite_with_bad_data_keeps_the_earlier_runs_checkpoints(model_dir, pairs_file, tmp_path):
    settings = ["--loss", "simpo", "--set", "train.batch_size=4", "--set", "train.max_steps=1"]
    settings += ["--set", "train.save_every=1"]
    output = tmp_path / "out"
    assert main(train_argv(model_dir, pairs_file, output, *settings)) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q:", "chosen": " a"\n')
    assert main(train_argv(model_dir, bad, output, *settings, "--set", "train.overwrite=true")) == 2
    assert (output / "checkpoint-1" / "preftune_state.json").is_file()


@pytest.mark.parametrize("module", ["preftune", pytest.param("preftune.cli", marks=pytest.mark.slow)])
def test_python_dash_m_runs_the_command_line(module):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", module, "losses"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "sigmoid" in done.stdout
