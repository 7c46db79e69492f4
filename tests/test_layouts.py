"""Prefix-shared and packed layouts give the padded layout's numbers: log-probs, gradients, losses."""

import pytest
import torch
from helpers import quiet_config, sentiment_records, tiny_gpt2, tiny_qwen2
from peft import LoraConfig, get_peft_model

from preftune.config import ConfigError, DataConfig, load_config
from preftune.data import TokenizedPair, prepare_pairs
from preftune.data.layouts import collate_pairs
from preftune.data.packing import collate_packed, collate_prefix_shared, first_fit
from preftune.experiments.synthetic import tiny_llama
from preftune.model.attention import allowed_pairs, choose_layout
from preftune.model.logps import LogpsRequest, sequence_logps
from preftune.recipes.dpo import train

RECORDS = [
    {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"},
    {"prompt": "Hello there, how are you", "chosen": " today?", "rejected": " fine, thank you."},
    {"prompt": "Question:", "chosen": " what colour is the sky? Answer: it is blue.", "rejected": " no"},
    {"prompt": "a", "chosen": " b", "rejected": " c d e f g h"},
]
LAYOUTS = {
    "prefix_shared": collate_prefix_shared,
    # A budget that puts two or three pairs in a row.
    "packed": lambda pairs, pad: collate_packed(pairs, pad, max_tokens=48),
}


def _pairs(tokenizer):
    return prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)[0]


# GPT-2 reads its learned absolute position embeddings through position_ids, so a rejected
# completion placed after chosen only matches its padded row if the layout's positions are used.
MODELS = {
    "llama": lambda n: tiny_llama(n, seed=1),
    "qwen2": lambda n: tiny_qwen2(n, seed=1),
    "gpt2": lambda n: tiny_gpt2(n, seed=1),
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sequence_and_token_logps_equal_the_padded_layouts(tokenizer, layout, family, attention):
    model = MODELS[family](len(tokenizer))
    model.config._attn_implementation = attention
    pairs = _pairs(tokenizer)
    per_token = LogpsRequest(per_token=True)
    padded = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id), per_token)
    shared = sequence_logps(model, LAYOUTS[layout](pairs, tokenizer.pad_token_id), per_token)
    torch.testing.assert_close(shared.logps, padded.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.token_logps, padded.token_logps, rtol=1e-5, atol=1e-5)
    assert shared.tokens.tolist() == padded.tokens.tolist()


def _grads(model, batch):
    weights = torch.linspace(-1, 1, batch.num_sequences)
    (sequence_logps(model, batch, chunk_size=5).logps * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradients_equal_the_padded_layouts(tokenizer, layout, family):
    pairs = _pairs(tokenizer)
    padded = _grads(MODELS[family](len(tokenizer)), collate_pairs(pairs, tokenizer.pad_token_id))
    shared = _grads(MODELS[family](len(tokenizer)), LAYOUTS[layout](pairs, tokenizer.pad_token_id))
    assert padded.keys() == shared.keys()
    for name, grad in padded.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def _lora_checkpointed(vocab_size):
    model = tiny_llama(vocab_size, seed=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_lora_with_gradient_checkpointing_gives_the_padded_layouts_gradients(tokenizer, layout):
    pairs = _pairs(tokenizer)
    padded = _grads(_lora_checkpointed(len(tokenizer)), collate_pairs(pairs, tokenizer.pad_token_id))
    shared = _grads(_lora_checkpointed(len(tokenizer)), LAYOUTS[layout](pairs, tokenizer.pad_token_id))
    assert padded and all("lora_" in name for name in padded)
    for name, grad in padded.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_rejected_never_sees_chosen_and_pairs_in_a_row_never_see_each_other():
    pairs = [TokenizedPair([1, 2], [3, 4], [5], index=0), TokenizedPair([6], [7], [8, 9], index=1)]
    batch = collate_packed(pairs, pad_token_id=0, max_tokens=16)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    allowed = allowed_pairs(batch.segment_ids)[0].int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1, 0, 0, 0, 0]  # rejected 5: its prompt and itself
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # chosen 4: its prompt and chosen
    assert allowed[8] == [0, 0, 0, 0, 0, 1, 0, 1, 1]  # the second pair's rejected: its own pair only
    # Rejected's first token is predicted from the prompt's last token (flat position 1), not chosen's.
    assert batch.label_index.tolist() == [2, 3, 6, 4, 7, 8]
    assert batch.label_source.tolist() == [1, 2, 5, 1, 5, 7]


def test_changing_chosen_leaves_rejected_logps_unchanged(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    pairs = [TokenizedPair([1, 20, 21], [30, 31, 2], [40, 2], index=0)]
    other = [TokenizedPair([1, 20, 21], [50, 51, 52, 53, 2], [40, 2], index=0)]
    a = sequence_logps(model, collate_prefix_shared(pairs, 0)).logps
    b = sequence_logps(model, collate_prefix_shared(other, 0)).logps
    assert a[1] == b[1] and a[0] != b[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_pair_without_a_prompt_gets_the_padded_layouts_numbers(tokenizer, layout):
    """Without a prompt a completion's first token has no predecessor and is not scored, in every
    layout; the last tokens (where a reward model reads) are the same tokens."""
    pairs = [
        TokenizedPair([], [30, 31, 2], [40, 2], index=0),
        TokenizedPair([1, 20, 21], [50, 2], [60, 61, 2], index=1),
        TokenizedPair([], [70, 2], [80], index=2),
    ]
    model = tiny_llama(len(tokenizer), seed=1)
    padded_batch, shared_batch = collate_pairs(pairs, 0), LAYOUTS[layout](pairs, 0)
    padded = sequence_logps(model, padded_batch, LogpsRequest(per_token=True))
    shared = sequence_logps(model, shared_batch, LogpsRequest(per_token=True))
    assert shared.tokens.tolist() == padded.tokens.tolist() == [2, 2, 1, 1, 3, 0]
    torch.testing.assert_close(shared.logps, padded.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.token_logps, padded.token_logps, rtol=1e-5, atol=1e-5)
    last_tokens = [b.input_ids.view(-1)[b.last_index].tolist() for b in (padded_batch, shared_batch)]
    assert last_tokens[0] == last_tokens[1] == [2, 2, 2, 2, 2, 80]


def test_gpt2_takes_the_mask_and_position_ids_so_it_is_not_refused(tokenizer):
    """GPT-2 builds its masks through transformers' masking utilities and reads position_ids, so
    it gets the shared layouts (and the equality tests above run it on them), no fallback."""
    assert choose_layout("auto", tiny_gpt2(len(tokenizer))) == ("packed", None)


def test_first_fit_fills_rows_longest_first_within_the_budget():
    assert first_fit([5, 9, 3, 4, 2], budget=10) == [[1], [0, 3], [2, 4]]
    assert first_fit([12, 3], budget=10) == [[0], [1]]  # too long for the budget: a row of its own


def test_packing_puts_several_pairs_in_a_row_and_counts_tokens_as_padded(tokenizer):
    pairs = _pairs(tokenizer)
    padded = collate_pairs(pairs, tokenizer.pad_token_id)
    packed = collate_packed(pairs, tokenizer.pad_token_id, max_tokens=48)
    assert packed.input_ids.shape[0] < len(pairs) and packed.input_ids.shape[1] <= 48
    assert packed.attention_mask.sum() == sum(
        len(p.prompt_ids + p.chosen_ids + p.rejected_ids) for p in pairs
    )
    assert packed.num_tokens == padded.num_tokens
    assert packed.label_tail.tolist() == padded.label_tail.tolist()


def _train(tmp_path, tokenizer, name, *overrides, model=None):
    records = sentiment_records(12, seed=4)
    config = quiet_config(str(tmp_path / name), "train.batch_size=4", "train.max_steps=3", *overrides)
    model = model if model is not None else tiny_llama(len(tokenizer), seed=5)
    return train(config, model=model, tokenizer=tokenizer, train_data=records).history


@pytest.mark.parametrize(
    "setting",
    [
        ("objective.loss=[sigmoid]",),
        ("objective.loss=[simpo]",),
        ("reference.strategy=precomputed", "objective.ld_alpha=0.5"),
        ("model.lora=true", "model.lora_r=4", "model.gradient_checkpointing=true"),
    ],
)
def test_training_logs_the_padded_layouts_losses_and_metrics(tmp_path, tokenizer, setting):
    padded = _train(tmp_path, tokenizer, "padded", "data.layout=padded", *setting)
    for layout in ("data.layout=prefix_shared", "data.pack_tokens=100"):  # packed: two pairs a row
        shared = _train(tmp_path, tokenizer, layout, layout, *setting)
        for a, b in zip(padded, shared, strict=True):
            for name in a.keys() - {"pairs_per_second", "tokens_per_second"}:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-5), (layout, a["step"], name)


def test_a_model_whose_attention_takes_no_mask_falls_back_to_padded_with_a_notice(
    tmp_path, tokenizer, capsys
):
    sliding = tiny_qwen2(len(tokenizer), use_sliding_window=True, sliding_window=8)
    _train(tmp_path, tokenizer, "run", "data.layout=prefix_shared", model=sliding)
    said = capsys.readouterr().out.splitlines()
    notices = [line for line in said if line.startswith("data.layout")]  # not the settings header's line
    assert len(notices) == 1 and "padded instead of prefix_shared" in notices[0] and "sliding" in notices[0]


def test_flash_attention_models_keep_the_padded_layout(tokenizer):
    model = tiny_llama(len(tokenizer))
    assert choose_layout("auto", model) == ("packed", None)
    model.config._attn_implementation = "flash_attention_2"
    layout, notice = choose_layout("auto", model)
    assert layout == "padded" and notice is not None and "flash_attention_2" in notice


@pytest.mark.slow
def test_flex_attention_block_mask_gives_the_padded_layouts_logps(tokenizer):
    """The forward only: flex attention has no backward on CPU (and compiles for about 30 s)."""
    model = tiny_llama(len(tokenizer), seed=1)
    pairs = _pairs(tokenizer)
    with torch.no_grad():
        padded = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id)).logps
        model.config._attn_implementation = "flex_attention"
        packed = sequence_logps(model, collate_packed(pairs, tokenizer.pad_token_id, max_tokens=48)).logps
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert choose_layout("auto", model, device_type="cpu")[0] == "padded"
    assert choose_layout("auto", model, device_type="cuda") == ("packed", None)


def test_layout_settings_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="did you mean 'packed'"):
        load_config(overrides=["data.layout=packd"])
    with pytest.raises(ConfigError, match=r"data\.pack_tokens: .*packed layout"):
        load_config(overrides=["data.layout=prefix_shared", "data.pack_tokens=512"])
    assert load_config().data.layout == "auto"
