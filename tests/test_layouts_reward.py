"""Reward models on the prefix-shared and packed layouts: the padded layout's rewards, gradients,
training metrics; the score of chosen read at chosen's last token, of rejected at rejected's."""

import pytest
import torch
from helpers import quiet_config, sentiment_records, tiny_qwen2_reward_model

from preftune.config import DataConfig
from preftune.data import TokenizedPair, prepare_pairs
from preftune.data.layouts import collate_pairs
from preftune.data.packing import collate_packed, collate_prefix_shared
from preftune.experiments.synthetic import tiny_reward_model
from preftune.model.attention import choose_layout
from preftune.model.reward_head import RewardModule
from preftune.recipes.reward import train_reward_model

RECORDS = [
    {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"},
    {"prompt": "Hello there, how are you", "chosen": " today?", "rejected": " fine, thank you."},
    {"prompt": "Question:", "chosen": " what colour is the sky? Answer: it is blue.", "rejected": " no"},
    {"prompt": "a", "chosen": " b", "rejected": " c d e f g h"},
]
LAYOUTS = {
    "prefix_shared": collate_prefix_shared,
    "packed": lambda pairs, pad: collate_packed(pairs, pad, max_tokens=48),  # two or three pairs a row
}
MODELS = {
    "llama": lambda n: tiny_reward_model(n, seed=1),
    "qwen2": lambda n: tiny_qwen2_reward_model(n, seed=1),
}


def _pairs(tokenizer):
    pairs = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)[0]
    return [*pairs, TokenizedPair([], [30, 31, 2], [40, 2], index=len(RECORDS))]  # and one without a prompt


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rewards_equal_the_padded_layouts(tokenizer, layout, family, attention):
    model = MODELS[family](len(tokenizer)).eval()
    model.config._attn_implementation = attention
    assert choose_layout("auto", model) == ("packed", None)
    pairs, pad = _pairs(tokenizer), tokenizer.pad_token_id
    with torch.no_grad():
        padded = RewardModule(model)(collate_pairs(pairs, pad))
        shared = RewardModule(model)(LAYOUTS[layout](pairs, pad))
    torch.testing.assert_close(shared, padded, rtol=1e-5, atol=1e-5)


def test_chosen_is_scored_at_its_last_token_and_rejected_never_sees_chosen(tokenizer):
    model = tiny_reward_model(len(tokenizer), seed=2).eval()
    pair = TokenizedPair([1, 20, 21], [30, 31, 2], [40, 2], index=0)
    longer = TokenizedPair([1, 20, 21], [50, 51, 52, 2], [40, 2], index=0)
    with torch.no_grad():
        a = RewardModule(model)(collate_prefix_shared([pair], 0))
        b = RewardModule(model)(collate_prefix_shared([longer], 0))
        alone = RewardModule(model)(collate_pairs([pair], 0))
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)  # rejected: the same, whatever chosen is
    assert abs(a[0] - b[0]) > 1e-3
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-5)


def _grads(model, batch):
    weights = torch.linspace(-1, 1, batch.num_sequences)
    (RewardModule(model)(batch) * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reward_gradients_equal_the_padded_layouts(tokenizer, layout, family):
    pairs, pad = _pairs(tokenizer), tokenizer.pad_token_id
    padded = _grads(MODELS[family](len(tokenizer)), collate_pairs(pairs, pad))
    shared = _grads(MODELS[family](len(tokenizer)), LAYOUTS[layout](pairs, pad))
    assert padded.keys() == shared.keys() and any("score" in name for name in padded)
    for name, grad in padded.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def _train(tmp_path, tokenizer, name, *overrides, model=None):
    # Adam steps a weight by lr·g/(|g| + ε): where a gradient is near zero, float rounding of the
    # order of ε moves the weight by up to lr/2 (in any layout: padding the rows wider does it
    # too). At 1e-4 three steps stay within 1e-5 of each other; at 1e-3 they drift to 2e-5.
    config = quiet_config(
        str(tmp_path / name),
        "train.batch_size=4",
        "train.max_steps=3",
        "train.eval_every=2",
        "train.learning_rate=1e-4",
        *overrides,
    )
    model = model if model is not None else tiny_reward_model(len(tokenizer), seed=5)
    records, held_out = sentiment_records(12, seed=4), sentiment_records(4, seed=7)
    result = train_reward_model(
        config, model=model, tokenizer=tokenizer, train_data=records, eval_data=held_out
    )
    return result.history


@pytest.mark.parametrize("centering", [(), ("rm.center_rewards_coefficient=0.01",)])
def test_reward_training_logs_the_padded_layouts_losses_and_metrics(tmp_path, tokenizer, centering):
    padded = _train(tmp_path, tokenizer, "padded", "data.layout=padded", *centering)
    assert any("eval_loss" in row for row in padded)
    for layout in ("data.layout=prefix_shared", "data.pack_tokens=100"):  # packed: two pairs a row
        shared = _train(tmp_path, tokenizer, layout, layout, *centering)
        for a, b in zip(padded, shared, strict=True):
            assert a.keys() == b.keys()
            for name in a.keys() - {"pairs_per_second", "tokens_per_second"}:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-5), (layout, a["step"], name)


def test_a_reward_model_that_cannot_take_the_mask_trains_padded_with_a_notice(tmp_path, tokenizer, capsys):
    sliding = tiny_qwen2_reward_model(len(tokenizer), use_sliding_window=True, sliding_window=8)
    _train(tmp_path, tokenizer, "run", "data.layout=packed", model=sliding)
    said = capsys.readouterr().out.splitlines()
    notices = [line for line in said if line.startswith("data.layout")]  # not the settings header's line
    assert len(notices) == 1 and "padded instead of packed" in notices[0] and "sliding" in notices[0]
