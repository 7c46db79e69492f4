"""KTO and kin: train a policy on unpaired examples, each completion desirable or not.

records (unpaired, or pairs unpaired) -> TokenizedUnpaired -> UnpairedBatch (the examples' rows,
and each prompt with another example's completion for the KL estimate) -> log-probs per sequence,
policy and reference -> UnpairedStats (with the micro-batch's KL estimate) -> objective
-> per-example losses and metrics -> the harness (accumulation, steps, logs, saves)

``preftune train --loss kto`` comes here: :func:`preftune.recipes.dpo.train` hands every
unpaired objective to :func:`train_kto`, so the command, pipeline stages and the Python ``train``
need nothing new. The KL estimate is per micro-batch, averaged over the processes, as TRL's
(:mod:`preftune.losses.unpaired`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data import TokenizedUnpaired, prepare_unpaired
from ..data.layouts import UnpairedBatch, collate_unpaired
from ..data.outputs import releases_locks
from ..data.unpaired import balance_warning
from ..engine import ExampleSteps, Harness, LossFn, Models, Task, TrainResult, sharding
from ..errors import ConfigError
from ..losses import (
    UnpairedObjective,
    UnpairedOutput,
    UnpairedStats,
    build_unpaired_objective,
    kto_reference_point,
)
from ..model.load import load_model, prepare_for_training
from ..model.logps import LogpsRequest, PolicyLogps, SequenceLogps
from ..model.reference import AdapterOffReference, ModelReference, build_reference, weights_digest
from .common import tokenizer_for


def unpaired_loss(
    objective: UnpairedObjective,
    reference: ModelReference | AdapterOffReference,
    gather_mean: Callable[[Tensor], Tensor] | None = None,
) -> LossFn:
    """A micro-batch's per-example losses and metrics. ``gather_mean`` averages the KL estimate
    over the processes while training (None: one process)."""

    def loss(policy: nn.Module, batch: UnpairedBatch) -> tuple[Tensor, dict[str, Tensor]]:
        sequences = policy(batch.completions)
        kl = sequences.logps.new_zeros(())
        if objective.needs_kl:
            assert batch.kl is not None, "the collator builds the KL sequences when the objective needs them"
            with torch.no_grad():
                policy_kl = policy(batch.kl, only_logps=True).logps
            # Evaluation is not collective: each process's shard may hold a different number of batches.
            gather = gather_mean if policy.training else None
            kl = kto_reference_point(policy_kl, reference.logps(batch.kl), gather)
        stats = UnpairedStats(sequences.logps, reference.logps(batch.completions), batch.desirable, kl)
        out = objective(stats)
        return out.losses, unpaired_metrics(stats, out, sequences)

    return loss


def unpaired_metrics(
    stats: UnpairedStats, out: UnpairedOutput, sequences: SequenceLogps
) -> dict[str, Tensor]:
    """Per-example values split by label, which :func:`summarize` turns into TRL's means over each
    kind; ``kl`` is one value per micro-batch (averaged over micro-batches, as TRL logs it)."""
    metrics = {"kl": stats.kl, "entropy_sum": sequences.stats["entropy"], "tokens": sequences.tokens}
    for side, mask in (("chosen", stats.desirable.float()), ("rejected", (~stats.desirable).float())):
        metrics[f"count/{side}"] = mask
        metrics[f"rewards_sum/{side}"] = out.rewards * mask
        metrics[f"logps_sum/{side}"] = stats.logps.detach() * mask
        metrics[f"logits_sum/{side}"] = sequences.stats["mean_logit"] * mask
        metrics[f"tokens/{side}"] = sequences.tokens * mask
    return metrics


def summarize(values: dict[str, float]) -> dict[str, float]:
    """TRL's names: ``rewards/*`` and ``logps/*`` are means over the desirable (``chosen``) or
    undesirable (``rejected``) examples, ``logits/*`` and ``entropy`` token means; a kind absent
    from the logged steps is left out, as TRL leaves it out."""
    out = {
        "loss": values["loss"],
        "kl": values["kl"],
        "entropy": values["entropy_sum"] / max(values["tokens"], 1e-12),
    }
    for side in ("chosen", "rejected"):
        count, tokens = values[f"count/{side}"], values[f"tokens/{side}"]
        if count > 0:
            out[f"rewards/{side}"] = values[f"rewards_sum/{side}"] / count
            out[f"logps/{side}"] = values[f"logps_sum/{side}"] / count
        if tokens > 0:
            out[f"logits/{side}"] = values[f"logits_sum/{side}"] / tokens
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def checked_objective(harness: Harness) -> UnpairedObjective:
    """The run's unpaired objective, refused before anything loads where the settings cannot serve it."""
    config = harness.config
    objective = build_unpaired_objective(config.objective)
    if config.reference.strategy == "none":
        raise ConfigError(f"reference.strategy: 'none' but objective '{objective.name}' needs a reference")
    if config.reference.strategy == "precomputed":
        # The cache is kept per pair; KTO's KL rows (a prompt with another example's completion)
        # exist only once a batch is drawn.
        raise ConfigError(
            f"reference.strategy: 'precomputed' is kept per pair; {objective.name} scores its unpaired "
            "examples with a live reference (use auto, copy, or adapter with LoRA)"
        )
    if objective.needs_kl and config.train.batch_size < 2:
        raise ConfigError(
            f"train.batch_size: {objective.name} estimates its KL term from the other examples of each "
            "micro-batch; with one example it would be the example's own log-ratio (use 2 or more)"
        )
    return objective


def load_examples(
    harness: Harness, tokenizer: Any, train_data: Any, eval_data: Any, objective: UnpairedObjective
) -> tuple[Sequence[TokenizedUnpaired], Sequence[TokenizedUnpaired], Any]:
    """Training and eval examples, every record checked; a warning when the two kinds are so
    unbalanced that their weights should change."""
    data, progress = harness.config.data, harness.config.train.progress and harness.is_main
    examples, report = prepare_unpaired(
        train_data if train_data is not None else data.path, tokenizer, data, data.split, progress
    )
    harness.say(f"data: {report.summary()}")
    params = objective.params
    advice = balance_warning(
        report.desirable, report.undesirable, params.desirable_weight, params.undesirable_weight
    )
    if advice and harness.is_main:
        warnings.warn(advice, stacklevel=3)
    eval_examples: Sequence[TokenizedUnpaired] = []
    if eval_data is not None or data.eval_path:
        eval_source = eval_data if eval_data is not None else data.eval_path
        eval_examples, _ = prepare_unpaired(eval_source, tokenizer, data, data.eval_split, False)
    return examples, eval_examples, report


def kl_gather(harness: Harness, objective: UnpairedObjective) -> Callable[[Tensor], Tensor] | None:
    """How the KL estimate is averaged over the processes (None: one process), said once."""
    accelerator, cfg = harness.accelerator, harness.config.train
    processes = accelerator.num_processes
    if objective.needs_kl:
        across = f" x {processes} processes" if processes > 1 else ""
        own = f"; each of a step's {cfg.grad_accum} micro-batches has its own" if cfg.grad_accum > 1 else ""
        harness.say(f"KL estimate: per micro-batch of {cfg.batch_size} examples{across}{own} (as TRL)")
    return (lambda kl: accelerator.reduce(kl, reduction="mean")) if processes > 1 else None


@releases_locks
def train_kto(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    reference_model: nn.Module | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``config.model`` (or ``model``) on the unpaired examples of ``config.data`` (or the
    records given) with an unpaired objective (``kto``, ``apo_zero_unpaired``)."""
    # check
    harness = Harness(config, "train")
    objective = checked_objective(harness)

    # data: every record checked before any model loads
    tokenizer = tokenizer_for(config, tokenizer)
    examples, eval_examples, report = load_examples(harness, tokenizer, train_data, eval_data, objective)
    harness.decide_start()

    # load
    model = prepare_for_training(model if model is not None else load_model(config.model), config.model)
    # Resuming must start from the same weights, or a live reference would silently differ
    # (taken before a sharded reference holds only its shards).
    start_digest = weights_digest(model, reference_model)

    # reference
    accelerator = harness.accelerator
    reference, strategy = build_reference(
        config,
        True,
        model,
        reference_model,
        [],
        tokenizer.pad_token_id,
        sharding.reference_placement(accelerator),
    )
    assert isinstance(reference, ModelReference | AdapterOffReference)
    params = objective.params
    weights = {"desirable_weight": params.desirable_weight, "undesirable_weight": params.undesirable_weight}
    shown = ", ".join(f"{name}={value}" for name, value in {"beta": params.beta, **weights}.items())
    harness.say(f"objective: {objective.name}, {shown}; reference: {strategy}")

    # loop, then final/: the harness
    task = Task(
        examples=examples,
        collate=partial(
            collate_unpaired,
            pad_token_id=tokenizer.pad_token_id,
            max_length=config.data.max_length,
            with_kl=objective.needs_kl,
        ),
        loss=unpaired_loss(objective, reference, kl_gather(harness, objective)),
        eval_examples=eval_examples,
        summarize=summarize,
        console=("loss", "kl", "rewards/margins"),
        unit="examples",
    )
    models = Models(
        PolicyLogps(model, LogpsRequest(stats=("mean_logit", "entropy")), config.train.logps_chunk_size),
        model,
        tokenizer,
        start_digest=start_digest,
        card={
            "kind": "kto",
            "objective": objective.name,
            "beta": params.beta,
            **weights,
            "reference": strategy,
        },
    )
    result = harness.fit(models, ExampleSteps(task, harness.accelerator, config.train), stop_after)
    result.data_report = report
    return result
