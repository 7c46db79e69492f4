"""The reference precompute and evaluation's log-probs batch with the run's layout and give the
padded layout's numbers."""

import json

import pytest
import torch
from helpers import quiet_config, sentiment_records, tiny_qwen2

import preftune.model.set_logps
from preftune.cli import main
from preftune.config import DataConfig
from preftune.data import TokenizedPair, prepare_pairs
from preftune.experiments.synthetic import tiny_llama
from preftune.model.reference import Batching, ModelReference, precompute
from preftune.model.set_logps import pair_logps
from preftune.recipes.dpo import train

# Prompts of different lengths, and one without a prompt: shared rows differ from padded ones.
RECORDS = [
    {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"},
    {"prompt": "Hello there, how are you", "chosen": " today?", "rejected": " fine, thank you."},
    {"prompt": "Question:", "chosen": " what colour is the sky? Answer: it is blue.", "rejected": " no"},
    {"prompt": "a", "chosen": " b", "rejected": " c d e f g h"},
    *sentiment_records(3, seed=2),
]
MODELS = {"llama": lambda n: tiny_llama(n, seed=1), "qwen2": lambda n: tiny_qwen2(n, seed=1)}
LAYOUTS = ("prefix_shared", "packed")


def _pairs(tokenizer):
    pairs = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)[0]
    return [*pairs, TokenizedPair([], [30, 31, 2], [40, 2], index=len(RECORDS))]


def _layouts_used(monkeypatch):
    """The layouts that collate functions are asked for from now on."""
    used = []
    original = preftune.model.set_logps.collate_for

    def spy(layout, *args, **kwargs):
        used.append(layout)
        return original(layout, *args, **kwargs)

    monkeypatch.setattr(preftune.model.set_logps, "collate_for", spy)
    return used


# --------------------------------------------------------------------------- the reference precompute


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_precomputed_tables_equal_the_padded_layouts(tokenizer, family, layout):
    reference = ModelReference(MODELS[family](len(tokenizer)))
    pairs, pad = _pairs(tokenizer), tokenizer.pad_token_id
    padded = precompute(reference, pairs, Batching(pad, 3), progress=False)
    # An 80-token budget: two pairs in most rows, one in some.
    shared = precompute(reference, pairs, Batching(pad, 3, layout, pack_tokens=80), progress=False)
    assert padded.keys() == shared.keys()
    for name, table in padded.items():
        assert not table.isnan().any()
        torch.testing.assert_close(shared[name], table, rtol=1e-5, atol=1e-5, msg=name)


def _precompute_run(tmp_path, tokenizer, *overrides, reference_model=None):
    config = quiet_config(
        str(tmp_path), "train.batch_size=4", "train.max_steps=1", "reference.strategy=precomputed", *overrides
    )
    records = sentiment_records(8, seed=3)
    train(config, model=tiny_llama(len(tokenizer), seed=5), tokenizer=tokenizer, train_data=records,
          reference_model=reference_model)  # fmt: skip


@pytest.mark.parametrize("layout", ["auto", "prefix_shared", "padded"])
def test_the_precompute_batches_in_the_runs_layout(tmp_path, tokenizer, capsys, layout):
    _precompute_run(tmp_path, tokenizer, f"data.layout={layout}")
    chosen = "packed" if layout == "auto" else layout
    assert f"computed for 8 pairs ({chosen} layout)" in capsys.readouterr().out


def test_a_reference_that_cannot_take_the_mask_is_precomputed_padded_with_a_notice(
    tmp_path, tokenizer, capsys
):
    sliding = tiny_qwen2(len(tokenizer), seed=1, use_sliding_window=True, sliding_window=8)
    _precompute_run(tmp_path, tokenizer, reference_model=sliding)
    out = capsys.readouterr().out.splitlines()
    notices = [line for line in out if line.startswith("reference log-probs: data.layout")]
    assert len(notices) == 1 and "padded instead of packed" in notices[0] and "sliding" in notices[0]
    assert any("computed for 8 pairs (padded layout)" in line for line in out)


# --------------------------------------------------------------------------- evaluation's pair log-probs


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("layout", ["auto", *LAYOUTS])
def test_pair_logps_equal_the_padded_layouts(tokenizer, family, layout):
    model, pairs = MODELS[family](len(tokenizer)), _pairs(tokenizer)
    padded = pair_logps(model, pairs, tokenizer.pad_token_id, batch_size=3, layout="padded")
    shared = pair_logps(model, pairs, tokenizer.pad_token_id, batch_size=3, layout=layout, pack_tokens=80)
    for name, column in vars(padded).items():
        torch.testing.assert_close(getattr(shared, name), column, rtol=1e-5, atol=1e-5, msg=name)
    assert shared.chosen_tokens.tolist() == padded.chosen_tokens.tolist()


def test_pair_logps_default_to_packed_and_to_padded_where_the_mask_is_refused(tokenizer, monkeypatch):
    used = _layouts_used(monkeypatch)
    pairs = _pairs(tokenizer)
    pair_logps(tiny_llama(len(tokenizer)), pairs, tokenizer.pad_token_id)
    sliding = tiny_qwen2(len(tokenizer), seed=1, use_sliding_window=True, sliding_window=8)
    refused = pair_logps(sliding, pairs, tokenizer.pad_token_id, layout="packed")
    assert used == ["packed", "padded"]
    torch.testing.assert_close(refused.chosen, pair_logps(sliding, pairs, tokenizer.pad_token_id).chosen)


def test_eval_of_a_model_that_cannot_take_the_mask_runs_padded_with_a_notice(tmp_path, tokenizer, capsys):
    folder = tmp_path / "sliding"
    tiny_qwen2(len(tokenizer), seed=1, use_sliding_window=True, sliding_window=8).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    argv = ["eval", "--policy", str(folder), "--data", f"id={data}", "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    notices = [line for line in capsys.readouterr().out.splitlines() if "data.layout" in line]
    assert len(notices) == 1 and "padded instead of packed" in notices[0] and "sliding" in notices[0]
