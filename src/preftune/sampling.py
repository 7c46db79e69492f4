"""Sampling from a causal LM: batched, left-padded, the model's own distribution; and what
is measured on samples of a policy and its reference (KL, rewards, win rate).

Every sample is drawn at temperature 1 with no top-k, top-p or other warping, whatever the
checkpoint's ``generation_config.json`` asks for: a KL estimate or a win rate is a statement
about the model's distribution, so that is what is sampled. Completions end at the first EOS
(kept, as training appends it) or at ``max_new_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .config_rl import RolloutConfig
from .data import Text, TokenizedPair
from .data.prompts import Prompt
from .metrics import kl_estimate
from .rollout import Completion, TransformersRollout, eos_ids
from .scoring import Scorer
from .set_logps import completion_logps, pair_logps

BATCH_SIZE = 64


def generate(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
    progress: bool = False,
    desc: str = "sampling",
) -> list[list[int]]:
    """One sampled completion (token ids) per prompt, from the model's unwarped distribution."""
    params = RolloutConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, batch_size=batch_size
    )
    rollout = TransformersRollout(model, pad_token_id, stop_ids, progress)
    return [completion.ids for completion in rollout.generate(prompt_ids, params, seed, desc)]


def sample(model: Any, tokenizer: Any, prompts: list[str], seed: int, max_new_tokens: int = 12) -> list[str]:
    """One sampled completion per text prompt (temperature 1), decoded without special tokens."""
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    completions = generate(
        model, prompt_ids, tokenizer.pad_token_id, eos_ids(model, tokenizer), max_new_tokens, seed
    )
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


def as_completion(prompt: Text, text: str) -> Text:
    """A decoded completion in the prompt's shape: text, or one assistant message."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def sample_report(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: dict[tuple[int, ...], Text],
    scorer: Scorer | None,
    per_prompt: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
    progress: bool = False,
    name: str = "",
    layout: str = "auto",
) -> dict[str, Any]:
    """``per_prompt`` samples from policy and from reference for each prompt (token ids -> the
    text or messages a scorer reads): the KL(π‖π_ref) estimate, and with a scorer the samples'
    mean rewards and the policy's win rate (ties count half).

    The KL is in nats per sequence; ``kl_reference_policy`` is KL(π_ref‖π) from the reference's
    samples, which the same two forward passes give for free."""
    prompt_ids = [list(ids) for ids in prompts for _ in range(per_prompt)]
    texts = [text for text in prompts.values() for _ in range(per_prompt)]
    pad, stop = tokenizer.pad_token_id, eos_ids(policy, tokenizer)
    ours = generate(
        policy, prompt_ids, pad, stop, max_new_tokens, seed, progress=progress, desc=f"{name}: policy samples"
    )
    theirs = generate(
        reference,
        prompt_ids,
        pad,
        stop,
        max_new_tokens,
        seed + 1,
        progress=progress,
        desc=f"{name}: reference samples",
    )
    # Each prompt's policy and reference sample as one "pair": one forward per model scores both.
    pairs = [
        TokenizedPair(p, a, b, i) for i, (p, a, b) in enumerate(zip(prompt_ids, ours, theirs, strict=True))
    ]
    under_policy = pair_logps(
        policy, pairs, pad, batch_size, progress, f"{name}: samples under the policy", layout
    )
    under_reference = pair_logps(
        reference, pairs, pad, batch_size, progress, f"{name}: samples under the reference", layout
    )
    kl, kl_stderr = kl_estimate(under_policy.chosen, under_reference.chosen)
    reverse_kl, _ = kl_estimate(under_reference.rejected, under_policy.rejected)
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "samples_per_prompt": per_prompt,
        "kl_policy_reference": kl,
        "kl_policy_reference_stderr": kl_stderr,
        "kl_reference_policy": reverse_kl,
        "tokens_policy": under_policy.chosen_tokens.mean().item(),
        "tokens_reference": under_policy.rejected_tokens.mean().item(),
        "reward_policy": None,
        "reward_reference": None,
        "win_rate_policy_vs_reference": None,
    }
    if scorer is not None:
        decoded = tokenizer.batch_decode(ours + theirs, skip_special_tokens=True)
        completions = [as_completion(p, text) for p, text in zip(texts + texts, decoded, strict=True)]
        scores = scorer(texts + texts, completions)
        mine, others = scores[: len(texts)], scores[len(texts) :]
        wins = [float(a > b) + 0.5 * float(a == b) for a, b in zip(mine, others, strict=True)]
        report.update(
            reward_policy=sum(mine) / len(mine),
            reward_reference=sum(others) / len(others),
            win_rate_policy_vs_reference=sum(wins) / len(wins),
        )
    return report


def score_samples(
    prompts: list[Prompt],
    k: int,
    completions: list[Completion],
    scorer: Scorer,
    tokenizer: Any,
    missing_eos_penalty: float | None,
) -> list[dict[str, Any]]:
    """One row per sample: its text and ids, whether it ended with EOS, the scorer's reward and the
    reward used for pairing (minus the penalty when it did not end; NaN when unscored)."""
    texts = tokenizer.batch_decode([c.ids for c in completions], skip_special_tokens=True)
    prompt_texts = [prompt.text for prompt in prompts for _ in range(k)]
    scores = scorer(prompt_texts, [as_completion(p, t) for p, t in zip(prompt_texts, texts, strict=True)])
    rows = []
    for i, (completion, text, value) in enumerate(zip(completions, texts, scores, strict=True)):
        score = math.nan if value is None else float(value)
        penalty = missing_eos_penalty if missing_eos_penalty and not completion.ended else 0.0
        reward = score - penalty if math.isfinite(score) else None
        rows.append(
            {
                "prompt_index": i // k,
                "sample": i % k,
                "completion": text,
                "completion_ids": completion.ids,
                "eos": completion.ended,
                "score": score if math.isfinite(score) else None,
                "reward": reward,
            }
        )
    return rows


def sample_stats(
    samples: list[list[dict[str, Any]]],
    policy: nn.Module,
    initial: nn.Module,
    prompts: list[Prompt],
    pad: int,
    batch_size: int,
    is_initial: bool,
) -> dict[str, Any]:
    """Mean and max reward, EOS rate, length, and KL(π‖π_initial) estimated on the samples."""
    flat = [s for group in samples for s in group]
    rewards = [s["reward"] for s in flat if s["reward"] is not None]
    kl, kl_stderr = 0.0, 0.0
    if not is_initial:
        prompt_ids = [prompts[s["prompt_index"]].ids for s in flat]
        completion_ids = [s["completion_ids"] for s in flat]
        under_policy = completion_logps(policy, prompt_ids, completion_ids, pad, batch_size)
        under_initial = completion_logps(initial, prompt_ids, completion_ids, pad, batch_size)
        kl, kl_stderr = kl_estimate(under_policy, under_initial)
    return {
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "reward_max": max(rewards) if rewards else None,
        "eos_rate": sum(s["eos"] for s in flat) / len(flat),
        "completion_tokens": sum(len(s["completion_ids"]) for s in flat) / len(flat),
        "kl_to_initial": kl,
        "kl_to_initial_stderr": kl_stderr,
    }
