"""KTO in preftune: unpaired records, pairs unpaired, the KL rows of a batch, the objective's
configuration and the recipe on the harness (``train`` with ``objective.loss=kto``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import quiet_config, sentiment_records, unpaired_records

import preftune.data.unpaired as unpaired_data
from preftune.config import DataConfig, ObjectiveConfig, load_config
from preftune.data import DataError, prepare_unpaired
from preftune.data.layouts import collate_unpaired, kl_partners
from preftune.data.unpaired import balance_warning
from preftune.errors import ConfigError
from preftune.experiments.synthetic import tiny_llama
from preftune.losses import build_objective, build_unpaired_objective
from preftune.model.logps import LogpsRequest, PolicyLogps
from preftune.model.reference import ModelReference
from preftune.recipes.dpo import train
from preftune.recipes.kto import unpaired_loss

NO_LIMIT = DataConfig(max_length=None)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- records


def test_unpaired_records_keep_their_order_and_labels(tokenizer):
    records = [
        {"prompt": "Q:", "completion": " yes", "label": True},
        {"prompt": "Q:", "completion": " no", "label": False},
        {"prompt": "Q:", "completion": " maybe", "label": "false"},  # a CSV cell
        {"prompt": "Q:", "completion": " sure", "label": 1},
    ]
    examples, report = prepare_unpaired(records, tokenizer, NO_LIMIT, progress=False)
    assert [e.desirable for e in examples] == [True, False, False, True]
    assert [e.where for e in examples] == [f"record {i}" for i in range(4)]
    assert (report.desirable, report.undesirable, report.pairs) == (2, 2, 0)


def test_each_pair_becomes_a_desirable_and_an_undesirable_example_chosen_first(tokenizer):
    """TRL's unpairing order: the chosen completions of the pairs, then their rejected ones."""
    pairs = [{"prompt": f"Q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(3)]
    examples, report = prepare_unpaired(pairs, tokenizer, NO_LIMIT, progress=False)
    texts = [tokenizer.decode(e.prompt_ids + e.completion_ids, skip_special_tokens=True) for e in examples]
    assert texts == ["Q0: good 0", "Q1: good 1", "Q2: good 2", "Q0: bad 0", "Q1: bad 1", "Q2: bad 2"]
    assert [e.desirable for e in examples] == [True] * 3 + [False] * 3
    assert [e.where for e in examples] == ["record 0", "record 1", "record 2"] * 2
    assert (report.records, report.examples, report.pairs) == (3, 6, 3)


def test_pairs_are_unpaired_block_by_block(tokenizer, monkeypatch):
    """TRL unpairs in the batches of its ``datasets`` map (1000 pairs); with blocks of 2, three
    pairs give c0 c1 r0 r1 c2 r2."""
    monkeypatch.setattr(unpaired_data, "UNPAIR_BLOCK", 2)
    pairs = [{"prompt": "Q:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(3)]
    examples, _ = prepare_unpaired(pairs, tokenizer, NO_LIMIT, progress=False)
    texts = [tokenizer.decode(e.completion_ids, skip_special_tokens=True).strip() for e in examples]
    assert texts == ["good 0", "good 1", "bad 0", "bad 1", "good 2", "bad 2"]


def test_bad_records_are_reported_together_naming_file_line_and_field(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "Q:", "completion": " yes", "label": True},
            {"prompt": "Q:", "completion": " yes"},
            {"prompt": "Q:", "completion": " yes", "label": "yes"},
            {"prompt": "Q:", "completion": "   ", "label": True},
            {"prompt": "Q:", "completion": [{"role": "assistant", "content": "hi"}], "label": True},
            {"question": "Q:", "answer": " yes"},
        ],
    )
    strict = DataConfig(max_length=None, empty_completions="error")
    with pytest.raises(DataError) as caught:
        prepare_unpaired(str(path), tokenizer, strict, progress=False)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}:2: missing field 'label' (fields present: completion, prompt)"
    assert lines[1] == f"{path}: 4 more:"
    assert lines[2] == f"  {path}:3: field 'label' must be true (desirable) or false (undesirable), got 'yes'"
    assert lines[3].startswith(f"  {path}:4: field 'completion' is an empty completion")
    assert lines[4].startswith(f"  {path}:5: fields 'prompt' and 'completion' mix text and messages")
    assert lines[5].startswith(f"  {path}:6: expected fields 'prompt', 'completion' and 'label', or a pair")


def test_reading_stops_after_twenty_bad_records(tokenizer):
    records = [{"prompt": "Q:", "completion": " yes"}] * 30
    with pytest.raises(DataError) as caught:
        prepare_unpaired(records, tokenizer, NO_LIMIT, progress=False)
    assert "record 0: missing field 'label'" in str(caught.value).splitlines()[0]
    assert "19 more (reading stopped there)" in str(caught.value)


def test_field_names_are_configurable(tokenizer):
    records = [{"q": "Q:", "a": " yes", "good": True}, {"q": "Q:", "a": " no", "good": False}]
    cfg = DataConfig(max_length=None, prompt_field="q", completion_field="a", label_field="good")
    examples, _ = prepare_unpaired(records, tokenizer, cfg, progress=False)
    assert [e.desirable for e in examples] == [True, False]


def test_truncation_keeps_the_prompts_end_and_drops_a_prompt_that_fills_max_length(tokenizer):
    long_prompt = "review of the park and the movie and the book:"
    records = [
        {"prompt": long_prompt, "completion": " great", "label": True},
        {"prompt": "Q:", "completion": " yes", "label": False},
    ]
    whole_prompt = tokenizer(long_prompt)["input_ids"]
    cfg = DataConfig(max_length=len(whole_prompt) - 1, max_prompt_length=len(whole_prompt) - 2)
    examples, report = prepare_unpaired(records, tokenizer, cfg, progress=False)
    assert examples[0].prompt_ids == whole_prompt[2:]  # kept its end
    assert report.prompt_truncated == 1
    with pytest.warns(UserWarning, match="record 0: field 'prompt' is .* tokens, which fills"):
        examples, report = prepare_unpaired(records, tokenizer, DataConfig(max_length=4), progress=False)
    assert [e.where for e in examples] == ["record 1"] and report.dropped_overlong_prompt == 1
    with pytest.raises(DataError, match="record 0: field 'prompt'"):
        prepare_unpaired(
            records, tokenizer, DataConfig(max_length=4, overlong_prompt="error"), progress=False
        )


def test_the_balance_warning_follows_the_kto_papers_range():
    """λ_D n_D / (λ_U n_U) in [1, 4/3] is fine; 3 desirable to 1 undesirable at equal weights (3) is
    not, and the advice is λ_D in [1/3, 4/9] or λ_U in [2.25, 3]."""
    assert balance_warning(2, 2, 1.0, 1.0) is None
    assert balance_warning(3, 1, 1.0, 3.0) is None
    advice = balance_warning(3, 1, 1.0, 1.0)
    assert advice is not None and "desirable_weight in [0.333, 0.444]" in advice
    assert "undesirable_weight in [2.25, 3]" in advice


# --------------------------------------------------------------------------- the layout


def test_each_kl_row_pairs_a_prompt_with_the_completion_before_it_in_the_batch(tokenizer):
    assert kl_partners(4) == [3, 0, 1, 2]
    records = [{"prompt": f"Q{i}:", "completion": f" answer {i}", "label": i % 2 == 0} for i in range(3)]
    examples, _ = prepare_unpaired(records, tokenizer, NO_LIMIT, progress=False)
    batch = collate_unpaired(examples, tokenizer.pad_token_id)
    assert batch.kl is not None
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in batch.kl.input_ids]
    assert texts == ["Q0: answer 2", "Q1: answer 0", "Q2: answer 1"]
    assert batch.desirable.tolist() == [True, False, True]
    assert batch.num_examples == 3
    assert batch.num_tokens.item() == batch.completions.attention_mask.sum().item()  # KL rows not counted


def test_kl_rows_are_cut_to_max_length_keeping_their_start(tokenizer):
    records = [
        {"prompt": "Q:", "completion": " great calm kind brave warm", "label": True},
        {"prompt": "review of the park:", "completion": " no", "label": False},
    ]
    examples, _ = prepare_unpaired(records, tokenizer, NO_LIMIT, progress=False)
    limit = len(examples[1].prompt_ids) + 2
    batch = collate_unpaired(examples, tokenizer.pad_token_id, max_length=limit)
    assert batch.kl is not None
    assert batch.kl.input_ids[1].tolist() == (examples[1].prompt_ids + examples[0].completion_ids)[:limit]


def test_objectives_without_kl_get_no_kl_rows(tokenizer):
    examples, _ = prepare_unpaired(unpaired_records(2), tokenizer, NO_LIMIT, progress=False)
    assert collate_unpaired(examples, tokenizer.pad_token_id, with_kl=False).kl is None


# --------------------------------------------------------------------------- configuration


def test_the_weights_are_checked_when_the_config_loads():
    with pytest.raises(
        ConfigError, match=re.escape("objective.undesirable_weight: must be finite and >= 0, got -1")
    ):
        load_config(overrides=["objective.loss=kto", "objective.undesirable_weight=-1"])


def test_kto_is_trained_alone_and_refuses_the_pairwise_options():
    with pytest.raises(ConfigError, match="is trained alone"):
        build_unpaired_objective(ObjectiveConfig(loss=["kto", "sft"]))
    with pytest.raises(ConfigError, match="'kto' learns from unpaired examples"):
        build_objective(ObjectiveConfig(loss=["sigmoid", "kto"]))
    with pytest.raises(
        ConfigError, match=re.escape("objective.wpo: True applies to pairwise objectives, not kto")
    ):
        build_unpaired_objective(ObjectiveConfig(loss=["kto"], wpo=True))
    with pytest.raises(ConfigError, match=re.escape("objective.label_smoothing: 0.1 is ignored by 'kto'")):
        build_unpaired_objective(ObjectiveConfig(loss=["kto"], label_smoothing=0.1))


def test_the_kto_weights_are_refused_for_pairwise_objectives():
    with pytest.raises(
        ConfigError, match=re.escape("objective.desirable_weight: 2.0 is ignored by 'sigmoid'; only")
    ):
        build_objective(ObjectiveConfig(loss=["sigmoid"], desirable_weight=2.0))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("reference.strategy=precomputed", "reference.strategy: 'precomputed' is kept per pair; kto scores"),
        ("train.batch_size=1", "train.batch_size: kto estimates its KL term from the other examples"),
    ],
)
def test_refused_before_any_model_loads(tmp_path, tokenizer, setting, message):
    cfg = quiet_config(str(tmp_path), "objective.loss=kto", setting)
    with pytest.raises(ConfigError, match=message):
        train(cfg, tokenizer=tokenizer, train_data=unpaired_records(4))  # no model: it must not get that far


# --------------------------------------------------------------------------- the recipe


def test_the_kl_estimate_is_gathered_while_training_and_not_in_evaluation(tokenizer):
    """The recipe hands the micro-batch estimate to ``gather_mean`` (the processes' mean) only in
    training mode: evaluation shards may hold different numbers of batches, so no collective."""
    policy_model, reference_model = tiny_llama(len(tokenizer), seed=1), tiny_llama(len(tokenizer), seed=2)
    policy = PolicyLogps(policy_model, LogpsRequest(stats=("mean_logit", "entropy")))
    examples, _ = prepare_unpaired(unpaired_records(4), tokenizer, NO_LIMIT, progress=False)
    batch = collate_unpaired(examples, tokenizer.pad_token_id)
    seen: list[float] = []

    def gather_mean(local: torch.Tensor) -> torch.Tensor:
        seen.append(local.item())
        return local + 100.0  # another process far above: the estimate must come from here

    objective = build_unpaired_objective(ObjectiveConfig(loss=["kto"]))
    loss = unpaired_loss(objective, ModelReference(reference_model), gather_mean)
    _, metrics = loss(policy.train(), batch)
    assert len(seen) == 1 and metrics["kl"].item() == pytest.approx(seen[0] + 100.0)
    _, metrics = loss(policy.eval(), batch)
    assert len(seen) == 1 and metrics["kl"].item() == pytest.approx(max(seen[0], 0.0))


TRL_KTO_METRICS = (
    "loss",
    "kl",
    "entropy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "learning_rate",
    "num_tokens",
)


def test_train_with_kto_runs_the_unpaired_recipe_and_logs_trls_metric_names(tmp_path, tokenizer, capsys):
    cfg = quiet_config(
        str(tmp_path), "objective.loss=kto", "train.max_steps=2", "train.batch_size=2", "train.eval_every=2"
    )
    result = train(
        cfg,
        model=tiny_llama(len(tokenizer), seed=5),
        tokenizer=tokenizer,
        train_data=sentiment_records(4, seed=3),  # pairs: unpaired into 8 examples
        eval_data=unpaired_records(3, seed=4),
    )
    out = capsys.readouterr().out
    assert "data: 8/8 examples kept (4 desirable, 4 undesirable) from 4 records; 4 pairs unpaired" in out
    assert "KL estimate: per micro-batch of 2 examples (as TRL)" in out
    logged = {name for row in result.history for name in row}
    assert set(TRL_KTO_METRICS) <= logged
    assert {f"eval_{name}" for name in ("loss", "kl", "rewards/chosen", "rewards/rejected")} <= logged
    assert not any(name.startswith(("count/", "rewards_sum/", "tokens/")) for name in logged)
    card = (result.final_dir / "README.md").read_text()
    assert "| objective | kto |" in card and "| desirable_weight | 1.0 |" in card


def test_without_a_kl_term_accumulation_is_exact(tmp_path, tokenizer):
    """apo_zero_unpaired reads no batch statistic: 2 micro-batches of 2 give the losses of one
    batch of 4. (KTO's estimate is per micro-batch, as TRL's: there accumulation changes it.)"""
    data = unpaired_records(8, seed=6)

    def losses(batch_size: int, grad_accum: int) -> list[float]:
        cfg = quiet_config(
            str(tmp_path / f"{batch_size}x{grad_accum}"),
            "objective.loss=apo_zero_unpaired",
            "train.max_steps=2",
            f"train.batch_size={batch_size}",
            f"train.grad_accum={grad_accum}",
        )
        model, reference = tiny_llama(len(tokenizer), seed=5), tiny_llama(len(tokenizer), seed=7)
        result = train(cfg, model=model, tokenizer=tokenizer, train_data=data, reference_model=reference)
        return [row["loss"] for row in result.history]

    assert losses(2, 2) == pytest.approx(losses(4, 1), abs=1e-6)
