"""Sampling draws from the model's own distribution, and the sample-based KL estimate is exact
in expectation: checked against KL computed by enumerating every completion of a tiny model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from preftune.data import TokenizedPair
from preftune.evaluation.metrics import sampled_kl
from preftune.experiments.synthetic import tiny_llama
from preftune.generation.rollout import Completion, cut_at_stop, left_pad
from preftune.generation.sampling import generate
from preftune.model.set_logps import pair_logps

VOCAB, EOS, PAD, LENGTH = 6, 2, 0, 3
PROMPT = [1, 4]


def peaked_model(seed: int, sharpness: float) -> torch.nn.Module:
    """A one-layer Llama over 6 tokens whose next-token distributions are far from uniform."""
    model = tiny_llama(VOCAB, hidden_size=16, layers=1, heads=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.eval()


def completions() -> list[tuple[int, ...]]:
    """Every completion of at most LENGTH tokens that ends at the first EOS or at the limit."""
    out = []
    for length in range(1, LENGTH + 1):
        for tokens in itertools.product(range(VOCAB), repeat=length):
            if EOS in tokens[:-1] or (length < LENGTH and tokens[-1] != EOS):
                continue
            out.append(tokens)
    return out


@torch.no_grad()
def exact_logps(model: torch.nn.Module, ys: list[tuple[int, ...]]) -> torch.Tensor:
    """log p(y | prompt) with the full softmax, token by token."""
    out = []
    for y in ys:
        ids = torch.tensor([PROMPT + list(y)])
        logits = model(input_ids=ids).logits[0].double().log_softmax(-1)
        out.append(sum(logits[len(PROMPT) - 1 + t, token] for t, token in enumerate(y)))
    return torch.stack(out)


def test_the_enumeration_covers_all_the_probability():
    model = peaked_model(1, 25.0)
    assert exact_logps(model, completions()).exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_sample_based_kl_matches_the_exact_kl_of_an_enumerable_model():
    policy, reference = peaked_model(1, 12.0), peaked_model(2, 12.0)
    ys = completions()
    pi, rho = exact_logps(policy, ys), exact_logps(reference, ys)
    exact = (pi.exp() * (pi - rho)).sum().item()
    assert exact > 1.0  # far enough from zero for the comparison to mean something

    # A checkpoint's sampling defaults must not reshape what is sampled.
    policy.generation_config.temperature, policy.generation_config.top_p = 0.3, 0.5
    samples = generate(policy, [PROMPT] * 4000, PAD, [EOS], LENGTH, seed=0, batch_size=500)
    assert policy.generation_config.top_p == 0.5  # restored
    assert all(len(s) <= LENGTH and EOS not in s[:-1] for s in samples)

    pairs = [TokenizedPair(PROMPT, s, s, i) for i, s in enumerate(samples)]
    under_policy = pair_logps(policy, pairs, PAD, batch_size=500)
    under_reference = pair_logps(reference, pairs, PAD, batch_size=500)
    estimate, stderr = sampled_kl(under_policy.chosen, under_reference.chosen)
    assert abs(estimate - exact) < 4 * stderr
    assert estimate == pytest.approx(exact, rel=0.1)


def test_samples_follow_the_model_distribution_token_by_token():
    model = peaked_model(3, 8.0)
    model.generation_config.top_k, model.generation_config.temperature = 2, 0.5  # to be ignored
    samples = generate(model, [PROMPT] * 3000, PAD, [EOS], 1, seed=1, batch_size=500)
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([PROMPT])).logits[0, -1].double().softmax(-1)
    for token in range(VOCAB):
        share = sum(s == [token] for s in samples) / len(samples)
        sd = math.sqrt(probs[token].item() * (1 - probs[token].item()) / len(samples))
        assert abs(share - probs[token].item()) < 4 * sd + 1e-3


def test_identical_models_have_zero_kl_on_every_sample():
    model = peaked_model(1, 10.0)
    samples = generate(model, [PROMPT] * 50, PAD, [EOS], LENGTH, seed=0)
    pairs = [TokenizedPair(PROMPT, s, s, i) for i, s in enumerate(samples)]
    logps = pair_logps(model, pairs, PAD).chosen
    assert sampled_kl(logps, logps)[0] == 0.0


def test_left_padding_and_the_cut_at_the_first_eos():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 2, 0, 0], {2}) == Completion([4, 2], ended=True)
    assert cut_at_stop([4, 5, 3], {2}) == Completion([4, 5, 3], ended=False)


def test_a_left_padded_prompt_samples_as_it_would_alone():
    """Greedy-like check: with a very peaked model, the padded and unpadded prompt agree."""
    model = peaked_model(4, 200.0)
    alone = generate(model, [PROMPT], PAD, [EOS], LENGTH, seed=0)
    padded = generate(model, [[1, 3, 5, 4, 4], PROMPT], PAD, [EOS], LENGTH, seed=0)
    assert padded[1] == alone[0]
