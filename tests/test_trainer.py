"""The training loop: exact gradient accumulation, exact resume, checkpoints, logs."""

import json

import pytest
import torch
from helpers import THROUGHPUT_METRICS, TRL_METRICS, quiet_config, sentiment_records
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError
from preftune.experiments.synthetic import tiny_llama
from preftune.recipes.dpo import train

RECORDS = sentiment_records(16)


def _run(tmp_path, name, tokenizer, *overrides, **kwargs):
    cfg = quiet_config(str(tmp_path / name), *overrides)
    model = tiny_llama(len(tokenizer), seed=7)
    return train(cfg, model=model, tokenizer=tokenizer, train_data=RECORDS, **kwargs), model


def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(tmp_path, tokenizer):
    whole, whole_model = _run(tmp_path, "whole", tokenizer, "train.batch_size=8", "train.max_steps=3")
    accum, accum_model = _run(
        tmp_path, "accum", tokenizer, "train.batch_size=2", "train.grad_accum=4", "train.max_steps=3"
    )
    for a, b in zip(whole.history, accum.history, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    for p, q in zip(whole_model.parameters(), accum_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_after_a_checkpoint_reproduces_the_uninterrupted_losses_exactly(tmp_path, tokenizer):
    settings = ("train.batch_size=4", "train.max_steps=6", "train.save_every=2")
    full, _ = _run(tmp_path, "full", tokenizer, *settings)
    # Crash after step 3: the last checkpoint is step 2, so step 3 is redone after resuming.
    cut, _ = _run(tmp_path, "cut", tokenizer, *settings, stop_after=3)
    assert cut.steps == 3 and cut.final_dir is None
    resumed, _ = _run(tmp_path, "cut", tokenizer, *settings, "train.resume=true")
    full_losses = {h["step"]: h["loss"] for h in full.history}
    resumed_losses = {h["step"]: h["loss"] for h in resumed.history}
    assert sorted(resumed_losses) == [3, 4, 5, 6]
    for step, loss in resumed_losses.items():
        assert loss == full_losses[step], f"step {step}: {loss} != {full_losses[step]}"


def test_checkpoint_and_final_folders_load_with_transformers(tmp_path, tokenizer):
    result, model = _run(
        tmp_path, "run", tokenizer, "train.batch_size=4", "train.max_steps=3", "train.save_every=2"
    )
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "preftune_state.json").read_text())["step"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith((".tmp", ".old"))]
    assert leftovers == []


def test_old_checkpoints_beyond_the_limit_are_removed(tmp_path, tokenizer):
    _run(
        tmp_path,
        "run",
        tokenizer,
        "train.batch_size=4",
        "train.max_steps=7",
        "train.save_every=1",
        "train.save_total_limit=2",
    )
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-6", "checkpoint-7"]


def test_metrics_file_has_one_object_per_logged_step_with_trl_names(tmp_path, tokenizer):
    _run(tmp_path, "run", tokenizer, "train.batch_size=4", "train.max_steps=4", "train.log_every=2")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    expected = {*TRL_METRICS, *THROUGHPUT_METRICS}
    assert expected <= set(rows[0])
    assert rows[0]["pairs_per_second"] > 0


def test_evaluation_every_n_steps_logs_eval_metrics(tmp_path, tokenizer):
    result, _ = _run(
        tmp_path,
        "run",
        tokenizer,
        "train.batch_size=4",
        "train.max_steps=4",
        "train.eval_every=2",
        eval_data=sentiment_records(6, seed=5),
    )
    eval_rows = [h for h in result.history if "eval_loss" in h]
    assert [h["step"] for h in eval_rows] == [2, 4]  # every 2 steps; the last step is not evaluated twice
    assert 0 <= eval_rows[0]["eval_rewards/accuracies"] <= 1


def test_dpo_raises_the_reward_margin_on_its_training_pairs(tmp_path, tokenizer):
    result, _ = _run(tmp_path, "run", tokenizer, "train.batch_size=8", "train.max_steps=12")
    assert result.history[0]["rewards/margins"] == 0.0  # policy == reference at the first step
    assert result.history[-1]["rewards/margins"] > 0.05
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_resume_with_another_batch_geometry_is_refused(tmp_path, tokenizer):
    _run(
        tmp_path,
        "run",
        tokenizer,
        "train.batch_size=4",
        "train.max_steps=4",
        "train.save_every=2",
        stop_after=2,
    )
    with pytest.raises(
        ConfigError, match=r"train.batch_size/grad_accum: .*4 pairs per step, this run uses 2"
    ):
        _run(
            tmp_path,
            "run",
            tokenizer,
            "train.batch_size=2",
            "train.max_steps=4",
            "train.save_every=2",
            "train.resume=true",
        )


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tokenizer):
    plain, _ = _run(tmp_path, "plain", tokenizer, "train.batch_size=4", "train.max_steps=3")
    checkpointed, _ = _run(
        tmp_path,
        "ckpt",
        tokenizer,
        "train.batch_size=4",
        "train.max_steps=3",
        "model.gradient_checkpointing=true",
    )
    assert [h["loss"] for h in checkpointed.history] == pytest.approx(
        [h["loss"] for h in plain.history], abs=1e-6
    )


def test_tensorboard_events_are_written_when_enabled(tmp_path, tokenizer):
    pytest.importorskip("tensorboard")
    _run(tmp_path, "run", tokenizer, "train.batch_size=4", "train.max_steps=1", "train.report_to=tensorboard")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_from_other_starting_weights_is_refused(tmp_path, tokenizer):
    from preftune.engine.checkpoint import CheckpointError

    settings = ("train.batch_size=4", "train.max_steps=4", "train.save_every=2")
    _run(tmp_path, "run", tokenizer, *settings, stop_after=2)
    cfg = quiet_config(str(tmp_path / "run"), *settings, "train.resume=true")
    with pytest.raises(CheckpointError, match="starts from other weights"):
        train(cfg, model=tiny_llama(len(tokenizer), seed=99), tokenizer=tokenizer, train_data=RECORDS)


def test_resuming_a_finished_run_changes_nothing(tmp_path, tokenizer):
    settings = ("train.batch_size=4", "train.max_steps=2", "train.save_every=2")
    _run(tmp_path, "run", tokenizer, *settings)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    final = (tmp_path / "run" / "final" / "model.safetensors").stat().st_mtime_ns
    result, _ = _run(tmp_path, "run", tokenizer, *settings, "train.resume=true")
    assert result.history == []
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "run" / "final" / "model.safetensors").stat().st_mtime_ns == final


def test_resume_tolerates_a_metrics_line_torn_by_the_crash(tmp_path, tokenizer):
    settings = ("train.batch_size=4", "train.max_steps=4", "train.save_every=2")
    _run(tmp_path, "run", tokenizer, *settings, stop_after=3)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 0.6')  # half a line
    _run(tmp_path, "run", tokenizer, *settings, "train.resume=true")
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
