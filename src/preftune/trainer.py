"""The one training loop, shared by every objective. Read it top to bottom.

    pairs -> batch -> policy log-probs (+ reference log-probs) -> objective -> backward
    -> (after grad_accum micro-batches) clip -> AdamW step -> schedule -> log / eval / save

It runs single-process or under ``accelerate launch`` unchanged. Loss normalization is
exact: each micro-batch contributes ``sum(per-pair losses) / pairs per optimizer step``,
so accumulating 4 micro-batches of 2 pairs equals one batch of 8. Metrics stay on the
device as running sums and are read once per logging step (no host sync per micro-step).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoint import CheckpointError, load_checkpoint, prepare_output_dir, save_checkpoint, save_final
from .config import ConfigError, RunConfig, to_dict
from .data import DataReport, TokenizedPair, prepare_pairs
from .layouts import Batch, collate_pairs
from .logps import PolicyLogps
from .losses import Objective, PairStats, build_objective, reward_metrics
from .models import load_model, load_tokenizer, prepare_for_training, prepare_tokenizer
from .reference import Reference, build_reference, weights_digest


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None
    data_report: DataReport | None = None


def pair_stats(policy: nn.Module, reference: Reference | None, batch: Batch) -> tuple[PairStats, Tensor]:
    """Policy (and reference) statistics of a batch, plus ``[2, B]`` summed vocab-mean logits for metrics."""
    seq = policy(batch.input_ids, batch.attention_mask, batch.completion_mask, batch.label_index)
    chosen, rejected = seq.halves()
    ref_chosen = ref_rejected = None
    if reference is not None:
        ref_chosen, ref_rejected = reference.logps(batch)
    stats = PairStats(chosen.logps, rejected.logps, chosen.tokens, rejected.tokens, ref_chosen, ref_rejected)
    return stats, torch.stack([chosen.logits_sum, rejected.logits_sum])


METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "tokens/chosen",
    "tokens/rejected",
    "logits_sum/chosen",
    "logits_sum/rejected",
)


def batch_metrics(stats: PairStats, objective_out: Any, logits_sum: Tensor) -> dict[str, Tensor]:
    """Per-pair values (``[B]`` each) to be summed; :func:`summarize` turns the sums into metrics."""
    return {
        "loss": objective_out.losses.detach(),
        **reward_metrics(stats, objective_out),
        "tokens/chosen": stats.chosen_tokens,
        "tokens/rejected": stats.rejected_tokens,
        "logits_sum/chosen": logits_sum[0],
        "logits_sum/rejected": logits_sum[1],
    }


def summarize(names: Sequence[str], totals: Sequence[float], pairs: float) -> dict[str, float]:
    """Means over pairs, except ``logits/*``: a mean over completion tokens, as TRL logs it."""
    sums = dict(zip(names, totals, strict=True))
    values = {
        name: total / max(pairs, 1) for name, total in sums.items() if not name.startswith("logits_sum/")
    }
    for side in ("chosen", "rejected"):
        values[f"logits/{side}"] = sums[f"logits_sum/{side}"] / max(sums[f"tokens/{side}"], 1)
    return values


def _logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def data_stream(num_pairs: int, seed: int, shuffle: bool) -> Iterator[int]:
    """Endless pair indices: epoch after epoch, each a fresh seeded permutation.

    Stateless given the seed, so resuming at step k means skipping k · pairs-per-step items.
    """
    epoch = 0
    while True:
        if shuffle:
            order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(num_pairs))
        yield from order
        epoch += 1


def evaluate(
    policy: nn.Module,
    reference: Reference | None,
    objective: Objective,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    batch_size: int,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Mean of every metric over ``pairs`` (sharded across processes), prefixed ``eval_``.

    Runs the unwrapped module: a DDP forward talks to the other ranks, and shards may hold
    different numbers of batches. Only the final sum is collective.
    """
    module = accelerator.unwrap_model(policy)
    was_training = module.training
    module.eval()
    shard = list(pairs)[accelerator.process_index :: accelerator.num_processes]
    sums = {name: torch.zeros((), device=accelerator.device) for name in METRICS}
    count = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for start in range(0, len(shard), batch_size):
            batch = collate_pairs(shard[start : start + batch_size], pad_token_id).to(accelerator.device)
            with accelerator.autocast():
                stats, logits = pair_stats(module, reference, batch)
                out = objective(stats)
            for name, values in batch_metrics(stats, out, logits).items():
                sums[name] += values.float().sum()
            count += batch.num_pairs
    module.train(was_training)
    totals = accelerator.reduce(torch.stack([*sums.values(), count]), reduction="sum").tolist()
    return {f"eval_{name}": value for name, value in summarize(list(sums), totals[:-1], totals[-1]).items()}


def _check_distributed(accelerator: Accelerator) -> None:
    from accelerate.utils import DistributedType

    supported = {DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU}
    if accelerator.distributed_type not in supported:
        raise ConfigError(
            f"accelerate: {accelerator.distributed_type.value} is not supported yet (checkpoints and gradient "
            "clipping assume replicated weights); launch with plain DDP or a single process"
        )


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
    """Train ``config.model`` on ``config.data`` (or the objects given) with ``config.objective``.

    ``stop_after`` ends the run after that many optimizer steps as if interrupted (checkpoints
    and resume are tested with it).
    """
    cfg = config.train
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mixed)
    _check_distributed(accelerator)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    is_main = accelerator.is_main_process
    say = print if is_main else (lambda *a, **k: None)
    objective = build_objective(config.objective)

    # ---- tokenizer and data (every bad record is reported before a model loads)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model, config.data.chat_template)
    else:
        tokenizer = prepare_tokenizer(tokenizer, config.model, config.data.chat_template)
    source = train_data if train_data is not None else config.data.path
    pairs, report = prepare_pairs(source, tokenizer, config.data, config.data.split, cfg.progress and is_main)
    say(f"data: {report.summary()}")
    eval_pairs: list[TokenizedPair] = []
    if eval_data is not None or config.data.eval_path:
        eval_source = eval_data if eval_data is not None else config.data.eval_path
        eval_pairs, _ = prepare_pairs(eval_source, tokenizer, config.data, config.data.eval_split, False)
        # Keys of the precomputed reference follow every training record's index, dropped ones included.
        eval_pairs = [
            TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, report.records + p.index, p.where)
            for p in eval_pairs
        ]
    pad_id = tokenizer.pad_token_id
    # After the data is known good, so a bad record never costs an earlier run its checkpoints.
    resume_from = prepare_output_dir(output_dir, cfg.resume, cfg.overwrite, is_main)

    # ---- model and reference
    model = prepare_for_training(model if model is not None else load_model(config.model), config.model)
    device = accelerator.device
    reference, strategy = build_reference(
        config,
        objective.needs_reference,
        model,
        reference_model,
        pairs + eval_pairs,
        pad_id,
        device,
        accelerator.autocast,
        is_main,
    )
    say(f"objective: {objective.name} (beta={objective.params.beta}); reference: {strategy}")

    # ---- optimizer and schedule
    policy = PolicyLogps(model, cfg.logps_chunk_size)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    pairs_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(pairs) / pairs_per_step))
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    schedule = "constant_with_warmup" if cfg.scheduler == "constant" and warmup else cfg.scheduler
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # Resuming must start from the same weights, or a live reference would silently differ.
    start_digest = weights_digest(model, reference_model)
    # The scheduler stays out of prepare(): accelerate would step it once per process.
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy).model

    # ---- resume: weights, optimizer, schedule, RNG and the position in the data stream
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, unwrapped, optimizer, scheduler)
        if state.get("pairs_per_step", pairs_per_step) != pairs_per_step:
            raise ConfigError(
                f"train.batch_size/grad_accum: {resume_from} was trained with {state['pairs_per_step']} pairs "
                f"per step, this run uses {pairs_per_step}; resume with the same batch geometry"
            )
        if state.get("start_digest", start_digest) != start_digest:
            raise CheckpointError(
                f"{resume_from}: this run starts from other weights than the run being resumed (a changed hub "
                "revision, or a model object that was already trained); its reference would differ"
            )
        start_step = state["step"]
        say(f"resumed from {resume_from} at step {start_step}")
    stream = data_stream(len(pairs), cfg.seed, cfg.shuffle)
    for _ in range(start_step * pairs_per_step):
        next(stream)

    # ---- logging
    metrics_file = None
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        metrics_path = output_dir / "metrics.jsonl"
        # Keep what was logged up to the resumed step; a fresh run starts a fresh file.
        kept = (
            metrics_path.read_text().splitlines() if resume_from is not None and metrics_path.exists() else []
        )
        kept = [line for line in kept if _logged_step(line) <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics_file = metrics_path.open("a")
    writer = None
    if is_main and cfg.tensorboard:
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run logged after its last checkpoint.
            writer = SummaryWriter(
                str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
    history: list[dict[str, float]] = []
    sums = {name: torch.zeros((), device=device) for name in METRICS}
    window_pairs = torch.zeros((), device=device)
    window_tokens = torch.zeros((), device=device)
    grad_norms: list[Tensor] = []
    window_start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        disable=None if cfg.progress and is_main else True,
    )

    def log(step: int, values: dict[str, float]) -> None:
        record = {"step": step, **values}
        history.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if writer is not None:
            for name, value in values.items():
                writer.add_scalar(name, value, step)
        if cfg.progress and bar.disable:  # no terminal for a progress bar (a log file, CI): print a line
            prefix = "eval_" if "eval_loss" in values else ""
            say(
                f"step {step}/{total_steps} {prefix}loss {values[prefix + 'loss']:.4f} "
                f"{prefix}acc {values[prefix + 'rewards/accuracies']:.3f} "
                f"{prefix}margin {values[prefix + 'rewards/margins']:.4f}"
                + (f" pairs/s {values['pairs_per_second']:.1f}" if "pairs_per_second" in values else "")
            )

    def checkpoint(step: int) -> None:
        if is_main:
            state = {
                "pairs_seen": step * pairs_per_step,
                "pairs_per_step": pairs_per_step,
                "total_steps": total_steps,
                "start_digest": start_digest,
            }
            save_checkpoint(
                output_dir, step, unwrapped, tokenizer, optimizer, scheduler, state, cfg.save_total_limit
            )
        accelerator.wait_for_everyone()

    # ---- the loop
    last_step = min(total_steps, stop_after) if stop_after else total_steps
    policy.train()
    step = start_step
    for step in range(start_step + 1, last_step + 1):
        step_order = [next(stream) for _ in range(pairs_per_step)]
        for micro in range(cfg.grad_accum):
            offset = (micro * accelerator.num_processes + accelerator.process_index) * cfg.batch_size
            batch = collate_pairs([pairs[i] for i in step_order[offset : offset + cfg.batch_size]], pad_id)
            batch = batch.to(device)
            last_micro = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(policy):
                with accelerator.autocast():
                    stats, logits = pair_stats(policy, reference, batch)
                    out = objective(stats)
                # Exact normalization: every micro-batch divides by the pairs of the whole step.
                accelerator.backward(out.losses.sum() / (cfg.batch_size * cfg.grad_accum))
            for name, per_pair in batch_metrics(stats, out, logits).items():
                sums[name] += per_pair.float().sum()
            window_pairs += batch.num_pairs
            window_tokens += batch.attention_mask.sum()
        if cfg.max_grad_norm is not None:
            grad_norms.append(accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm).detach())
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)

        if step % cfg.log_every == 0 or step == last_step:
            elapsed = time.perf_counter() - window_start
            totals = accelerator.reduce(
                torch.stack([*sums.values(), window_pairs, window_tokens]), "sum"
            ).tolist()
            n_pairs, n_tokens = totals[-2], totals[-1]
            values = summarize(list(sums), totals[:-2], n_pairs)
            if grad_norms:
                values["grad_norm"] = torch.stack(grad_norms).mean().item()
            values.update(
                learning_rate=learning_rate,
                pairs_per_second=n_pairs / elapsed,
                tokens_per_second=n_tokens / elapsed,
                epoch=step * pairs_per_step / len(pairs),
            )
            log(step, values)
            bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                acc=f"{values['rewards/accuracies']:.2f}",
                pairs_s=f"{values['pairs_per_second']:.1f}",
            )
            for total in (*sums.values(), window_pairs, window_tokens):
                total.zero_()
            grad_norms = []
            window_start = time.perf_counter()
        if eval_pairs and cfg.eval_every and step % cfg.eval_every == 0:
            log(step, evaluate(policy, reference, objective, eval_pairs, pad_id, cfg.batch_size, accelerator))
        # The last step is saved too: a finished run can be extended with more steps and --resume.
        if cfg.save_every is not None and (step % cfg.save_every == 0 or step == total_steps):
            checkpoint(step)
    bar.close()

    final_dir = None
    if start_step >= total_steps:  # resumed a finished run: nothing to redo
        say(f"the run already reached step {total_steps}; raise train.max_steps to continue it")
        final_dir = output_dir / "final"
    elif step == total_steps:
        if eval_pairs and not (cfg.eval_every and step % cfg.eval_every == 0):
            log(step, evaluate(policy, reference, objective, eval_pairs, pad_id, cfg.batch_size, accelerator))
        if is_main:
            final_dir = save_final(output_dir, unwrapped, tokenizer)
            say(f"saved {final_dir}")
    if metrics_file is not None:
        metrics_file.close()
    if writer is not None:
        writer.close()
    # Every rank leaves together (the main one was saving). The process group stays up: it
    # belongs to the launcher, and destroying it under a live DDP wrapper hangs gloo at exit.
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, step, history, final_dir, report)
