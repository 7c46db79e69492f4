"""The harness around every recipe: batch-coupled objectives, the layout's pair map, trackers,
the model card, and the failure-mode metrics the loop's evaluation logs."""

import json

import pytest
import torch
from helpers import quiet_config, sentiment_records

from preftune.config import ConfigError, DataConfig, ObjectiveConfig
from preftune.data import prepare_pairs
from preftune.data.layouts import collate_pairs, tail_of
from preftune.experiments.synthetic import tiny_llama
from preftune.losses import build_objective
from preftune.model.logps import sequence_logps
from preftune.recipes.dpo import logps_request, pair_stats, train

RECORDS = sentiment_records(16, seed=5)


def _train(tmp_path, tokenizer, *overrides, **kwargs):
    cfg = quiet_config(str(tmp_path / "run"), "train.max_steps=2", *overrides)
    return train(
        cfg, model=tiny_llama(len(tokenizer), seed=3), tokenizer=tokenizer, train_data=RECORDS, **kwargs
    )


@pytest.mark.parametrize("loss", ["aot", "aot_unpaired"])
def test_objective_that_sorts_across_the_batch_refuses_a_step_split_into_micro_batches(
    tmp_path, tokenizer, loss
):
    """AOT sorts log-ratios across the batch: 4 micro-batches of 2 gave 0.8494 where one batch of
    8 gives 0.7506 on the same pairs. The run refuses before any model loads."""
    with pytest.raises(
        ConfigError, match=rf"train.grad_accum: objective.loss: {loss} sorts .* across the batch"
    ):
        _train(tmp_path, tokenizer, f"objective.loss={loss}", "train.batch_size=2", "train.grad_accum=4")
    assert not (tmp_path / "run").exists()


def test_objective_that_sorts_across_the_batch_trains_on_whole_steps(tmp_path, tokenizer):
    result = _train(tmp_path, tokenizer, "objective.loss=aot", "train.batch_size=8")
    assert len(result.history) == 2 and all(h["loss"] > 0 for h in result.history)


def test_pair_statistics_follow_the_batchs_sequence_map_not_row_order(tokenizer):
    """Rejected rows placed first (a layout's choice) give the same per-pair statistics, LD-DPO's
    tails and WPO's sums included."""
    model = tiny_llama(len(tokenizer), seed=4).eval()
    pairs, _ = prepare_pairs(RECORDS[:3], tokenizer, DataConfig(), progress=False)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    swapped = collate_pairs(pairs, tokenizer.pad_token_id)
    order = torch.cat([batch.rejected, batch.chosen])  # rows: rejected ones, then chosen ones
    width = batch.input_ids.shape[1]
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(order.numel())
    swapped.input_ids, swapped.attention_mask = batch.input_ids[order], batch.attention_mask[order]
    swapped.label_sequence = new_row[batch.label_sequence]
    swapped.label_index = new_row[batch.label_index // width] * width + batch.label_index % width
    swapped.label_index, sort = swapped.label_index.sort()
    swapped.label_sequence = swapped.label_sequence[sort]
    swapped.chosen, swapped.rejected = new_row[batch.chosen], new_row[batch.rejected]
    swapped.label_tail = tail_of(swapped.label_sequence, swapped.chosen, swapped.rejected, 6)
    request = logps_request(build_objective(ObjectiveConfig(loss=["sigmoid"], ld_alpha=0.5, wpo=True)))
    with torch.no_grad():
        expected = pair_stats(sequence_logps(model, batch, request), None, batch)
        got = pair_stats(sequence_logps(model, swapped, request), None, swapped)
    assert expected.tails is not None and got.tails is not None
    for stats, other in ((got, expected), (got.tails, expected.tails)):
        torch.testing.assert_close(stats.chosen_logps, other.chosen_logps)
        torch.testing.assert_close(stats.rejected_logps, other.rejected_logps)
        torch.testing.assert_close(stats.chosen_tokens, other.chosen_tokens)
        torch.testing.assert_close(stats.rejected_tokens, other.rejected_tokens)
    torch.testing.assert_close(got.chosen_wpo_logps, expected.chosen_wpo_logps)
    assert (expected.tails.chosen_tokens + expected.tails.rejected_tokens > 0).all()


def test_evaluation_logs_likelihood_drift_and_ranking_consistency(tmp_path, tokenizer):
    result = _train(tmp_path, tokenizer, "train.batch_size=4", eval_data=RECORDS[:6])
    final = result.history[-1]
    for name in (
        "drift/chosen",
        "drift/rejected",
        "drift/chosen_fell",
        "ranking/policy",
        "ranking/reference",
        "implicit/accuracy",
    ):
        assert f"eval_{name}" in final
    # The reference is the starting policy: before training both rank alike.
    assert 0 <= final["eval_drift/chosen_fell"] <= 1


def test_unknown_tracker_is_refused_naming_the_key(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"^train.report_to: unknown tracker 'tensorbord'.*did you mean"):
        _train(tmp_path, tokenizer, "train.report_to=tensorbord")


def test_tracker_that_is_not_installed_is_refused_before_any_model_loads(tmp_path, tokenizer):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"^train.report_to: 'wandb' is not installed"):
        _train(tmp_path, tokenizer, "train.report_to=wandb")
    assert not (tmp_path / "run").exists()


def test_tensorboard_tracker_gets_every_logged_metric(tmp_path, tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, tokenizer, "train.batch_size=4", "train.report_to=tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"loss", "rewards/accuracies", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_final_folder_carries_a_model_card(tmp_path, tokenizer):
    result = _train(tmp_path, tokenizer, "train.batch_size=4", "objective.loss=dpop")
    card = (result.final_dir / "README.md").read_text()
    assert "| objective | dpop |" in card and "| rewards/accuracies |" in card and "| steps | 2 |" in card


def test_metrics_file_is_strict_json_with_a_step_per_line(tmp_path, tokenizer):
    _train(tmp_path, tokenizer, "train.batch_size=4")
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
