"""Sampling from a causal LM: batched, left-padded, the model's own distribution; the scoring of
online DPO's and PPO's samples.

Every sample is drawn at temperature 1 with no top-k, top-p or other warping, whatever the
checkpoint's ``generation_config.json`` asks for: a KL estimate or a win rate is a statement
about the model's distribution, so that is what is sampled. Completions end at the first EOS
(kept, as training appends it) or at ``max_new_tokens``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ..config.rl import RolloutConfig
from ..data import Text
from ..data.prompts import Prompt
from ..data.report import shown
from ..errors import ScorerError
from .aggregate import Scores, score_detail
from .rollout import Completion, TransformersRollout, eos_ids
from .scoring import Scorer, scorer_name

BATCH_SIZE = 64


def generate(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
    progress: str | None = None,
) -> list[list[int]]:
    """One sampled completion (token ids) per prompt, from the model's unwarped distribution;
    ``progress``: the label of a progress bar over the batches (None: no bar)."""
    params = RolloutConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, batch_size=batch_size
    )
    rollout = TransformersRollout(model, pad_token_id, stop_ids, progress is not None)
    return [
        completion.ids for completion in rollout.generate(prompt_ids, params, seed, progress or "sampling")
    ]


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


def score_samples(
    prompts: list[Prompt],
    k: int,
    completions: list[Completion],
    scorer: Scorer,
    tokenizer: Any,
    missing_eos_penalty: float | None,
    monitor: Scorer | None = None,
) -> list[dict[str, Any]]:
    """One row per sample: its text and ids, whether it ended with EOS, the scorer's reward and the
    reward used for pairing (minus the penalty when it did not end; NaN when unscored). A scorer
    with several members adds each member's score (``member_scores``); a ``monitor`` scores the
    same texts (``monitor``), for the record only."""
    texts = tokenizer.batch_decode([c.ids for c in completions], skip_special_tokens=True)
    prompt_texts = [prompt.text for prompt in prompts for _ in range(k)]
    shaped = [as_completion(p, t) for p, t in zip(prompt_texts, texts, strict=True)]
    scores = score_detail(scorer, prompt_texts, shaped)
    watched = score_detail(monitor, prompt_texts, shaped).rewards if monitor is not None else None
    rewards = scores.rewards
    if rewards and all(value is None or not math.isfinite(float(value)) for value in rewards):
        raise ScorerError(
            f"{scorer_name(scorer)} returned NaN or None (unscored) for every one of the {len(rewards)} "
            f"samples, so no pair can be built; it is the scorer, not the sampling: check it on a completion "
            f"such as {shown(texts[0], 50)}"
        )
    rows = []
    for i, (completion, text, value) in enumerate(zip(completions, texts, scores.rewards, strict=True)):
        score = math.nan if value is None else float(value)
        penalty = missing_eos_penalty if missing_eos_penalty and not completion.ended else 0.0
        reward = score - penalty if math.isfinite(score) else None
        row = {
            "prompt_index": i // k,
            "sample": i % k,
            "completion": text,
            "completion_ids": completion.ids,
            "eos": completion.ended,
            "score": score if math.isfinite(score) else None,
            "reward": reward,
        }
        if scores.members is not None and len(scores.members[i]) > 1:
            row["member_scores"] = [v if math.isfinite(v) else None for v in scores.members[i]]
        if watched is not None:
            row["monitor"] = watched[i] if math.isfinite(watched[i]) else None
        rows.append(row)
    return rows


def sample_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The members' disagreement (mean over samples of their standard deviation, and each member's
    mean score) and the monitor's mean, where the rows hold them."""
    out: dict[str, Any] = {}
    members = [row["member_scores"] for row in rows if row.get("member_scores")]
    if members:
        scores = Scores(
            [math.nan] * len(members), [[math.nan if v is None else v for v in m] for m in members]
        )
        out["reward_disagreement"] = scores.disagreement()
        out["reward_members"] = scores.member_means()
    watched = [row["monitor"] for row in rows if row.get("monitor") is not None]
    if any("monitor" in row for row in rows):
        out["monitor_mean"] = sum(watched) / len(watched) if watched else None
        # The standard error of that mean: how far it moves by chance (the monitor's noise rule).
        out["monitor_sem"] = statistics.stdev(watched) / math.sqrt(len(watched)) if len(watched) > 1 else None
    return out
