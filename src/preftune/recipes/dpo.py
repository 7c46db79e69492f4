"""The DPO family: train a policy on preference pairs with any registered objective
(unpaired objectives such as KTO go to :mod:`.kto`).

records -> TokenizedPair -> Batch (a layout) -> log-probs per sequence, policy and reference
-> PairStats (the batch says which sequence is which pair's chosen / rejected)
-> objective -> per-pair losses and metrics -> the harness (accumulation, steps, logs, saves)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.layouts import Batch
from ..data.outputs import releases_locks
from ..data.packing import collate_for
from ..engine import ExampleSteps, Harness, LossFn, Models, Task, TrainResult, sharding
from ..errors import ConfigError
from ..evaluation.metrics import preference_metrics
from ..losses import Objective, PairStats, build_objective, is_unpaired
from ..model.load import load_model, prepare_for_training
from ..model.logps import LogpsRequest, PolicyLogps, SequenceLogps
from ..model.reference import Reference, build_reference, weights_digest
from .common import layout_for, load_pairs, tokenizer_for
from .kto import train_kto


def logps_request(objective: Objective) -> LogpsRequest:
    """What the policy's forward computes for ``objective``: the mean logits of TRL's ``logits/*``
    metrics; with LD-DPO the sums over the batch's tails; with WPO each token's ``log Σ_v p_v²``
    beside its log-prob (:func:`wpo_logps`)."""
    return LogpsRequest(
        stats=("mean_logit",) + ("log_sum_sq",) * objective.needs_wpo,
        per_token=objective.needs_wpo,
        masks=("label_tail",) * objective.needs_tails,
    )


def wpo_logps(policy: SequenceLogps, batch: Batch) -> Tensor | None:
    """``[S]`` WPO's detached ``Σ_t (log p(y_t) − log Σ_v p(v)²)`` of each sequence, when the
    policy's statistics carry each token's ``log Σ_v p(v)²``."""
    log_sum_sq = policy.token_stats.get("log_sum_sq")
    if log_sum_sq is None or policy.token_logps is None:
        return None
    adjusted = policy.token_logps.detach() - log_sum_sq
    return adjusted.new_zeros(batch.num_sequences).index_add(0, batch.label_sequence, adjusted)


def pair_stats(
    policy: SequenceLogps,
    reference: Tensor | None,
    batch: Batch,
    reference_tails: Tensor | None = None,
) -> PairStats:
    """Per-pair statistics from per-sequence ones, through the batch's sequence -> pair map;
    with the tails' sums (LD-DPO) and WPO's sums when the policy's statistics carry them."""
    chosen, rejected = batch.chosen, batch.rejected

    def pick(values: Tensor | None, side: Tensor) -> Tensor | None:
        return None if values is None else values[side]

    tails = None
    policy_tails = policy.masked_logps.get("label_tail")
    if policy_tails is not None:
        shared = torch.minimum(policy.tokens[chosen], policy.tokens[rejected])
        tails = PairStats(
            policy_tails[chosen],
            policy_tails[rejected],
            policy.tokens[chosen] - shared,
            policy.tokens[rejected] - shared,
            pick(reference_tails, chosen),
            pick(reference_tails, rejected),
        )
    wpo = wpo_logps(policy, batch)
    return PairStats(
        policy.logps[chosen],
        policy.logps[rejected],
        policy.tokens[chosen],
        policy.tokens[rejected],
        pick(reference, chosen),
        pick(reference, rejected),
        tails=tails,
        chosen_wpo_logps=pick(wpo, chosen),
        rejected_wpo_logps=pick(wpo, rejected),
    )


def pair_loss(objective: Objective, reference: Reference | None) -> LossFn:
    """A micro-batch's per-pair losses and metrics (:mod:`preftune.evaluation.metrics`, TRL's names)."""

    def loss(policy: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        sequences = policy(batch)
        ref, ref_tails = None, None
        if reference is not None and objective.needs_tails:
            ref, ref_tails = reference.logps_and_tails(batch)
        elif reference is not None:
            ref = reference.logps(batch)
        stats = pair_stats(sequences, ref, batch, ref_tails)
        out = objective(stats)
        return out.losses, {
            **preference_metrics(stats, out),
            "tokens/chosen": stats.chosen_tokens,
            "tokens/rejected": stats.rejected_tokens,
            "logits_sum/chosen": sequences.stats["mean_logit"][batch.chosen],
            "logits_sum/rejected": sequences.stats["mean_logit"][batch.rejected],
        }

    return loss


def summarize(values: dict[str, float]) -> dict[str, float]:
    """``logits/*`` is a mean over completion tokens, as TRL logs it; the rest are pair means."""
    out = {name: value for name, value in values.items() if not name.startswith("logits_sum/")}
    for side in ("chosen", "rejected"):
        out[f"logits/{side}"] = values[f"logits_sum/{side}"] / max(values[f"tokens/{side}"], 1e-12)
    return out


def checked_objective(harness: Harness) -> Objective:
    """The run's objective, refused before anything loads where the settings cannot serve it."""
    objective = build_objective(harness.config.objective)
    if objective.needs_reference and harness.config.reference.strategy == "none":
        raise ConfigError(f"reference.strategy: 'none' but objective '{objective.name}' needs a reference")
    refuse_quantize_without_reference(harness.config, objective)
    if objective.couples_batch:
        harness.refuse_split_steps(f"objective.loss: {objective.name} sorts its log-ratios across the batch")
    return objective


def refuse_quantize_without_reference(config: RunConfig, objective: Objective) -> None:
    """``reference.quantize`` on a reference-free objective would quantize nothing: a knob silently
    ignored is a wasted run."""
    if config.reference.quantize != "none" and not objective.needs_reference:
        raise ConfigError(
            f"reference.quantize: objective '{objective.name}' is reference-free; there is no reference "
            "to quantize (leave reference.quantize=none)"
        )


@releases_locks
def train(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    reference_model: nn.Module | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config.model`` (or ``model``) on ``config.data`` (or the records given) with
    ``config.objective``. ``stop_after`` ends the run after that many steps, as if interrupted.

    An unpaired objective (``kto``, ``apo_zero_unpaired``) is trained by :func:`train_kto`, on
    unpaired records or these pairs unpaired."""
    if is_unpaired(config.objective):
        return train_kto(
            config,
            model=model,
            tokenizer=tokenizer,
            train_data=train_data,
            eval_data=eval_data,
            reference_model=reference_model,
            stop_after=stop_after,
        )
    # check
    harness = Harness(config, "train")
    objective = checked_objective(harness)

    # data: every record checked before any model loads
    tokenizer = tokenizer_for(config, tokenizer)
    pairs, eval_pairs, report = load_pairs(harness, tokenizer, train_data, eval_data)
    harness.decide_start()

    # load
    model = prepare_for_training(model if model is not None else load_model(config.model), config.model)
    # Resuming must start from the same weights, or a live reference would silently differ
    # (taken before a sharded reference holds only its shards).
    start_digest = weights_digest(model, reference_model)

    # reference
    reference, strategy = build_reference(
        config,
        objective.needs_reference,
        model,
        reference_model,
        pairs + eval_pairs,
        tokenizer.pad_token_id,
        sharding.reference_placement(harness.accelerator),
    )
    named = "+".join(config.objective.loss)
    shown = named if named == objective.name else f"{named} ({objective.name})"  # `dpo` is `sigmoid`
    harness.say(f"objective: {shown}, beta={objective.params.beta}; reference: {strategy}")
    layout = layout_for(harness, model, reference)

    # loop, then final/: the harness
    task = Task(
        examples=pairs,
        collate=collate_for(layout, tokenizer.pad_token_id, config.data.pack_tokens),
        loss=pair_loss(objective, reference),
        eval_examples=eval_pairs,
        summarize=summarize,
        console=("loss", "rewards/accuracies", "rewards/margins"),
    )
    models = Models(
        PolicyLogps(model, logps_request(objective), config.train.logps_chunk_size),
        model,
        tokenizer,
        start_digest=start_digest,
        card=dict(
            kind="dpo-family", objective=objective.name, beta=objective.params.beta, reference=strategy
        ),
    )
    result = harness.fit(models, ExampleSteps(task, harness.accelerator, config.train), stop_after)
    result.data_report = report
    return result
