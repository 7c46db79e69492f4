"""What is measured on samples of a policy and its reference: the KL(π‖π_ref) estimate, the
samples' rewards and the policy's win rate (``preftune eval --samples``, the experiments).

Every sample is drawn at temperature 1 with no top-k, top-p or other warping
(:func:`preftune.generation.sampling.generate`): a KL estimate or a win rate is a statement about
the model's distribution, so that is what is sampled.

Best-of-n (:func:`best_of_n`) selects from a pool of samples by a reward (an ensemble by its
aggregate) and reports the selected samples' reward by that reward and by another (the true one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..data.records import Text
from ..data.tokenize import TokenizedPair
from ..generation.aggregate import score_detail
from ..generation.rollout import eos_ids
from ..generation.sampling import as_completion, generate
from ..generation.scoring import Scorer
from ..model.set_logps import pair_logps
from .metrics import sampled_kl
from .settings import EvalSettings


def sample_report(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: dict[tuple[int, ...], Text],
    scorer: Scorer | None,
    settings: EvalSettings,
    name: str = "",
) -> dict[str, Any]:
    """``settings.samples`` samples from policy and from reference for each prompt (token ids -> the
    text or messages a scorer reads): the KL(π‖π_ref) estimate, and with a scorer the samples'
    mean rewards and the policy's win rate (ties count half). ``name`` labels the progress bars.

    The KL is in nats per sequence; ``kl_reference_policy`` is KL(π_ref‖π) from the reference's
    samples, which the same two forward passes give for free."""
    per_prompt, length, seed = settings.samples, settings.max_new_tokens, settings.seed
    prompt_ids = [list(ids) for ids in prompts for _ in range(per_prompt)]
    texts = [text for text in prompts.values() for _ in range(per_prompt)]
    pad, stop = tokenizer.pad_token_id, eos_ids(policy, tokenizer)

    def bar(label: str) -> str | None:
        return f"{name}: {label}" if settings.progress else None

    ours = generate(policy, prompt_ids, pad, stop, length, seed, progress=bar("policy samples"))
    theirs = generate(reference, prompt_ids, pad, stop, length, seed + 1, progress=bar("reference samples"))
    # Each prompt's policy and reference sample as one "pair": one forward per model scores both.
    pairs = [
        TokenizedPair(p, a, b, i) for i, (p, a, b) in enumerate(zip(prompt_ids, ours, theirs, strict=True))
    ]
    batch, layout, progress = settings.batch_size, settings.layout, settings.progress
    under_policy = pair_logps(
        policy, pairs, pad, batch, progress, f"{name}: samples under the policy", layout
    )
    under_reference = pair_logps(
        reference, pairs, pad, batch, progress, f"{name}: samples under the reference", layout
    )
    kl, kl_stderr = sampled_kl(under_policy.chosen, under_reference.chosen)
    reverse_kl, _ = sampled_kl(under_reference.rejected, under_policy.rejected)
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


# --------------------------------------------------------------------------- best-of-n


def expected_best_of_n(select: Sequence[float], measure: Sequence[float], n: int) -> float:
    """E[``measure`` of the sample ``select`` ranks highest among n drawn without replacement from
    a pool of M], exact: the (i+1)-th lowest by ``select`` is the best of a random n-subset with
    chance ``C(i, n−1) / C(M, n)`` (ties broken by pool order, the later one ranking higher).
    With ``measure = select`` it is the expected best reward itself."""
    order = sorted(range(len(select)), key=lambda i: select[i])
    total = math.comb(len(select), n)
    return sum(measure[j] * math.comb(i, n - 1) for i, j in enumerate(order)) / total


def best_of_n(
    scorer: Scorer,
    prompts: Sequence[Text],
    pools: Sequence[Sequence[Text]],
    ns: Sequence[int],
    measure: Scorer | None = None,
) -> list[dict[str, Any]]:
    """Best-of-n selected by ``scorer`` (an ensemble: by its aggregate) from a pool of samples per
    prompt, for each n: the expected selected reward by the scorer, and by ``measure`` when given
    (the true reward, a monitor); the KL of best-of-n to the sampling policy is at most
    ``log n − (n−1)/n`` (Beirami et al. 2024, arXiv 2401.01879), reported as the KL."""
    flat_prompts = [p for p, pool in zip(prompts, pools, strict=True) for _ in pool]
    flat = [c for pool in pools for c in pool]
    selected = score_detail(scorer, flat_prompts, flat)
    measured = score_detail(measure, flat_prompts, flat).rewards if measure is not None else None
    points = []
    for n in ns:
        by_scorer, by_measure, start = [], [], 0
        for pool in pools:
            chosen = selected.rewards[start : start + len(pool)]
            by_scorer.append(expected_best_of_n(chosen, chosen, n))
            if measured is not None:
                by_measure.append(expected_best_of_n(chosen, measured[start : start + len(pool)], n))
            start += len(pool)
        point = {"n": n, "kl": math.log(n) - (n - 1) / n, "reward": sum(by_scorer) / len(by_scorer)}
        if measured is not None:
            point["measured"] = sum(by_measure) / len(by_measure)
        points.append(point)
    return points
