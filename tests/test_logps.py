"""Sequence log-probs: the chunked hidden-state path equals the plain full-logits path."""

import pytest
import torch

from preftune.config import DataConfig, ObjectiveConfig
from preftune.data import TokenizedPair, prepare_pairs
from preftune.data.layouts import collate_pairs, tail_of
from preftune.experiments.synthetic import tiny_llama
from preftune.losses import build_objective
from preftune.model.logps import (
    STATS,
    LogpsRequest,
    full_logits_sequence_logps,
    label_logps,
    sequence_logps,
)
from preftune.recipes.dpo import logps_request, wpo_logps

RECORDS = [
    {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"},
    {"prompt": "Hello there, how are you", "chosen": " today?", "rejected": " fine, thank you."},
    {"prompt": "Question:", "chosen": " what colour is the sky? Answer: it is blue.", "rejected": " no"},
]


def _batch(tokenizer):
    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    return collate_pairs(pairs, tokenizer.pad_token_id)


def test_label_logps_equals_log_softmax_gather():
    logits = torch.randn(5, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (5, 7))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(label_logps(logits, labels), expected.float())


def test_chunked_sequence_logps_match_full_logits_for_every_chunk_size(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    batch = _batch(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    expected = full_logits_sequence_logps(model, *args)
    for chunk_size in (1, 3, 7, 4096):
        got = sequence_logps(model, batch, chunk_size=chunk_size)
        torch.testing.assert_close(got.logps, expected, rtol=1e-5, atol=1e-5)


def test_chunked_gradients_match_full_logits_gradients(tokenizer):
    batch = _batch(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    plain, chunked = tiny_llama(len(tokenizer), seed=2), tiny_llama(len(tokenizer), seed=2)
    weights = torch.linspace(-1, 1, batch.input_ids.shape[0])
    (full_logits_sequence_logps(plain, *args) * weights).sum().backward()
    (sequence_logps(chunked, batch, chunk_size=5).logps * weights).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_token_counts_cover_completion_tokens_only(tokenizer):
    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    got = sequence_logps(tiny_llama(len(tokenizer)), batch)
    expected = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert got.tokens.tolist() == expected


def test_padding_does_not_change_a_sequence_logp(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    alone = collate_pairs(pairs[:1], tokenizer.pad_token_id)
    padded = collate_pairs(pairs[:1], tokenizer.pad_token_id, pad_to_multiple_of=64)
    a = sequence_logps(model, alone)
    b = sequence_logps(model, padded)
    assert padded.input_ids.shape[1] == 64
    torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)


def _tiny(config_cls, model_cls, vocab_size, **extra):
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        **extra,
    )
    return model_cls(config)


def test_gemma2_softcapping_and_cohere_logit_scale_match_their_full_logits(tokenizer):
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    batch = _batch(tokenizer)
    args = (batch.input_ids, batch.attention_mask, batch.completion_mask)
    models = [
        _tiny(Gemma2Config, Gemma2ForCausalLM, len(tokenizer), final_logit_softcapping=0.5),
        _tiny(CohereConfig, CohereForCausalLM, len(tokenizer), logit_scale=3.0),
    ]
    for model in models:
        got = sequence_logps(model, batch, chunk_size=4).logps
        torch.testing.assert_close(got, full_logits_sequence_logps(model, *args), rtol=1e-5, atol=1e-5)


def test_per_token_logps_come_from_the_same_chunked_path_and_sum_to_the_sequences(tokenizer):
    """Token log-probs (for PPO's per-token KL, LD-DPO, WPO) in label order, summing per sequence."""
    model = tiny_llama(len(tokenizer), seed=6)
    batch = _batch(tokenizer)
    got = sequence_logps(model, batch, LogpsRequest(per_token=True), chunk_size=3)
    assert got.token_logps is not None and got.token_logps.shape == batch.label_index.shape
    per_sequence = torch.zeros(batch.num_sequences).index_add(0, batch.label_sequence, got.token_logps)
    torch.testing.assert_close(per_sequence, got.logps)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    flat = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
    expected = flat[batch.label_index - 1, batch.input_ids.reshape(-1)[batch.label_index]]
    torch.testing.assert_close(got.token_logps, expected, rtol=1e-5, atol=1e-5)


def test_tail_marks_the_tokens_past_the_shorter_completion_of_each_pair():
    """Pair 0: chosen 2 tokens, rejected 3 (shared length 2): the rejected's last token is tail.
    Pair 1: chosen 4, rejected 1 (shared 1): the chosen's last 3 tokens are tail."""
    pairs = [
        TokenizedPair([1, 2], [5, 6], [7, 8, 9], index=0),
        TokenizedPair([1], [5, 6, 7, 8], [9], index=1),
    ]
    batch = collate_pairs(pairs, pad_token_id=0)
    # Label order: the rows (chosen 0, chosen 1, rejected 0, rejected 1), each left to right.
    assert batch.label_sequence.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3]
    expected = [False, False, False, True, True, True, False, False, True, False]
    assert batch.label_tail.tolist() == expected
    # The same map in another token order (a layout that interleaves sequences) marks the same tokens.
    order = torch.tensor([6, 0, 2, 9, 7, 1, 3, 8, 4, 5])
    shuffled = tail_of(batch.label_sequence[order], batch.chosen, batch.rejected, batch.num_sequences)
    assert shuffled.tolist() == [expected[i] for i in order.tolist()]


def _full_softmax_at_labels(model, batch):
    """The plain path's ``[N, V]`` logits and log-softmax at the positions predicting each label."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logits = logits.reshape(-1, logits.shape[-1])[batch.label_index - 1]
    return logits, torch.log_softmax(logits, -1)


def test_token_statistics_and_masked_sums_come_from_the_same_chunked_path(tokenizer):
    """Every per-token statistic equals the full softmax's, per token and summed per sequence,
    detached; a mask's sum (here the batch's tails) adds the token log-probs it marks."""
    model = tiny_llama(len(tokenizer), seed=6)
    batch = _batch(tokenizer)
    request = LogpsRequest(stats=STATS, per_token=True, masks=("label_tail",))
    got = sequence_logps(model, batch, request, chunk_size=3)
    logits, logp = _full_softmax_at_labels(model, batch)
    labels = batch.input_ids.reshape(-1)[batch.label_index]
    expected = {
        "mean_logit": logits.mean(-1),
        "log_sum_sq": torch.logsumexp(2 * logp, dim=-1),
        "correct": (logits.argmax(-1) == labels).float(),
        "entropy": -(logp.exp() * logp).sum(-1),
    }
    assert expected.keys() == set(STATS)
    for name, values in expected.items():
        per_sequence = torch.zeros(batch.num_sequences).index_add(0, batch.label_sequence, values)
        torch.testing.assert_close(got.token_stats[name], values, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got.stats[name], per_sequence, rtol=1e-5, atol=1e-5, msg=name)
        assert not got.stats[name].requires_grad
    assert got.token_logps is not None
    tail = torch.zeros(batch.num_sequences).index_add(
        0, batch.label_sequence, got.token_logps * batch.label_tail
    )
    torch.testing.assert_close(got.masked_logps["label_tail"], tail)
    assert batch.label_tail.any() and (tail != 0).any() and got.masked_logps["label_tail"].requires_grad


def test_a_request_gives_what_it_asks_for_and_nothing_else(tokenizer):
    batch = _batch(tokenizer)
    got = sequence_logps(tiny_llama(len(tokenizer), seed=6), batch, LogpsRequest(stats=("entropy",)))
    assert got.stats.keys() == {"entropy"}
    assert not got.masked_logps and got.token_logps is None and not got.token_stats
    with pytest.raises(ValueError, match="unknown per-token statistics"):
        LogpsRequest(stats=("mean",))


def test_wpo_sums_of_the_dpo_recipes_request_follow_the_full_softmax(tokenizer):
    """The DPO recipe asks for each token's log Σ_v p(v)² under WPO; its sums add
    log p(y_t) − log Σ_v p(v)² per sequence, detached."""
    model = tiny_llama(len(tokenizer), seed=6)
    batch = _batch(tokenizer)
    objective = build_objective(ObjectiveConfig(loss=["sigmoid"], wpo=True))
    got = wpo_logps(sequence_logps(model, batch, logps_request(objective), chunk_size=3), batch)
    assert got is not None and not got.requires_grad
    _, logp = _full_softmax_at_labels(model, batch)
    token = logp.gather(1, batch.input_ids.reshape(-1)[batch.label_index, None]).squeeze(1)
    aligned = token - torch.logsumexp(2 * logp, dim=-1)
    expected = torch.zeros(batch.num_sequences).index_add(0, batch.label_sequence, aligned)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
