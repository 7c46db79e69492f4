"""PPO with a KL penalty: the RLHF baseline that DPO replaces (Ziegler et al. 2019; Stiennon et al.
2020; Ouyang et al. 2022), with the details Huang et al. 2024 (arXiv 2403.17031) found essential.

    for step k = 1 .. ppo.steps:
        prompts   <- the next ppo.rollouts_per_step prompts of a seeded stream
        rollouts  <- one completion each from the policy (rollout.*, seeded by k)
        scores    <- the reward model or function; minus rollout.missing_eos_penalty without EOS
        no_grad:     log π_old, log π_ref per token (at the sampling temperature), V_old per token
        rewards   <- −β·KL_t on every token (k1 or k3), + the score on the last token
        A, R      <- GAE(γ, λ); A whitened over the batch
        ppo_epochs passes, each num_mini_batches updates on a seeded shuffle of the rollouts:
            loss = clipped policy loss + vf_coef · clipped value loss, a mean over the tokens
            (forwards of train.batch_size sequences), clip the gradient, optimizer and schedule step
        β <- fixed, or adaptive towards ppo.target_kl
        log; checkpoint every train.save_every steps: policy, critic, optimizer, schedule, RNG, β, step
    final/ <- the policy, saved as `train` saves it

The recipe owns this loop (a rollout phase, then several passes over the rollouts, does not fit
the harness's one stream of examples) and borrows the harness's parts: accelerator, seeding,
output-folder rules, optimizer and schedule, checkpoints, metrics, signals and the non-finite guard.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import RunConfig, to_dict
from ..data.layouts import collate_sequences
from ..data.prompts import read_prompts
from ..engine import Harness, data_stream
from ..engine.card import model_card
from ..engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, save_final
from ..engine.guard import (
    NonFiniteError,
    Signals,
    StopRequested,
    check_finite_weights,
    nonfinite_message,
    step_verdict,
)
from ..engine.tracking import MetricsLog, check_trackers, console_line
from ..errors import CheckpointError, ConfigError
from ..generation.rollout import Rollout, eos_ids
from ..generation.scoring import Scorer, load_scorer
from ..generation.vllm_engine import check_engine, rollout_factory
from ..losses.ppo import KLController, policy_loss, value_loss
from ..model.load import load_model, prepare_for_training
from ..model.reference import reference_model, weights_digest
from ..model.reward_head import token_values
from .common import tokenizer_for
from .online import RolloutFactory
from .ppo_experience import (
    Experience,
    build_critic,
    chunks,
    collect,
    policy_tokens,
    step_seed,
)

CONSOLE = (("score", "objective/scores"), ("kl", "objective/kl"), ("vf", "loss/value_avg"))
CURRENT = ("episode", "learning_rate", "objective/kl_coef")
"""Logged as they are at the logged step; the other metrics are averaged over the steps since the last log."""


@dataclass
class PPOResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None


def train_ppo(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    prompts: Any = None,
    scorer: Scorer | None = None,
    rollout_for: RolloutFactory | None = None,
    stop_after: int | None = None,
) -> PPOResult:
    """``config.ppo.steps`` PPO steps from ``config.model`` (or ``model``, trained in place) on
    ``config.prompts`` (or the records given), rewarded by ``config.reward`` (or ``scorer``).
    ``rollout_for(policy)`` gives the sampler (default: transformers). ``stop_after`` ends the run
    after that many steps, as if interrupted."""
    harness = Harness(config)
    ppo, cfg = config.ppo, config.train
    check_run(config, prompts is not None, scorer is not None)
    if rollout_for is None:
        check_engine(config.rollout)
    tokenizer = tokenizer_for(config, tokenizer)
    source = prompts if prompts is not None else config.prompts.path
    prompt_rows = read_prompts(source, config.data, config.prompts.split, tokenizer, config.prompts.limit)
    if scorer is None:
        scorer = load_scorer(config.reward.scorer, batch_size=config.reward.batch_size)
    harness.decide_start()

    device, autocast = harness.device, harness.accelerator.autocast
    policy = model if model is not None else load_model(config.model)
    start_digest = weights_digest(policy)
    reference = reference_model(config, policy)
    critic, critic_source = build_critic(config, policy, scorer, tokenizer, harness.say)
    policy = prepare_for_training(policy, config.model).to(device)
    critic = prepare_for_training(critic, config.model, task_type="SEQ_CLS").to(device)
    if reference is not None:
        reference.to(device)
    policy.train()  # from_pretrained leaves eval mode; gradient checkpointing acts in train mode only
    critic.train()
    make_rollout = rollout_for or rollout_factory(
        config.rollout,
        config.model.name_or_path,
        tokenizer.pad_token_id,
        eos_ids(policy, tokenizer),
        cfg.progress,
    )
    sampler: Rollout = make_rollout(policy)
    trainable = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
    optimizer, scheduler = harness.optimizer_for(trainable, ppo.steps * ppo.ppo_epochs * ppo.num_mini_batches)
    kl_control = KLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
    geometry = {k: getattr(ppo, k) for k in ("rollouts_per_step", "ppo_epochs", "num_mini_batches")}
    start_step = resume(harness, policy, critic, optimizer, scheduler, kl_control, geometry, start_digest)
    harness.prepare_output_dir(policy, trainable)
    harness.say(
        f"ppo: {len(prompt_rows)} prompts, {ppo.rollouts_per_step} rollouts a step, {ppo.steps} steps; "
        f"kl_coef {ppo.kl_coef}{f' -> target {ppo.target_kl}' if ppo.target_kl else ''} ({ppo.kl_estimator}); "
        f"critic: {critic_source}; reward: {getattr(scorer, 'name', 'a scorer object')}"
    )

    stream = data_stream(len(prompt_rows), cfg.seed, cfg.shuffle)
    for _ in range(start_step * ppo.rollouts_per_step):
        next(stream)
    last_step = min(ppo.steps, stop_after) if stop_after else ppo.steps
    bar = tqdm(
        total=ppo.steps,
        initial=start_step,
        desc="ppo",
        disable=None if cfg.progress and harness.is_main else True,
    )
    console = (
        console_line(harness.say, CONSOLE, "rollouts", ppo.steps) if cfg.progress and bar.disable else None
    )
    log = MetricsLog(
        harness.output_dir,
        check_trackers(cfg.report_to),
        to_dict(config),
        start_step,
        harness.resume_from is not None,
        harness.is_main,
        console,
    )
    state = {**geometry, "start_digest": start_digest}
    step, skipped, window = start_step, 0, []
    with Signals() as signals:
        for step in range(start_step + 1, last_step + 1):
            started = time.perf_counter()
            prompts_now = [prompt_rows[next(stream)] for _ in range(ppo.rollouts_per_step)]
            rollouts = collect(
                config, step, prompts_now, sampler, scorer, tokenizer,
                policy, reference, critic, kl_control.value, device, autocast,
            )  # fmt: skip
            values, skipped = update(
                harness, config, step, rollouts, policy, critic, optimizer, scheduler, trainable,
                tokenizer.pad_token_id, skipped,
            )  # fmt: skip
            kl_control.update(rollouts.metrics["objective/kl"], ppo.rollouts_per_step)
            values |= rollouts.metrics | {"episode": step * ppo.rollouts_per_step}
            values["rollouts_per_second"] = ppo.rollouts_per_step / (time.perf_counter() - started)
            window.append(values)
            bar.update(1)
            stop = bool(signals.received)
            if step % cfg.log_every == 0 or step == last_step or stop:
                averaged = {name: _mean([v[name] for v in window if name in v]) for name in window[-1]}
                averaged |= {name: window[-1][name] for name in CURRENT}  # where the run is now
                log.log(step, averaged | ({"skipped_updates": float(skipped)} if skipped else {}))
                bar.set_postfix({label: f"{averaged[name]:.4g}" for label, name in CONSOLE})
                window = []
            if (cfg.save_every is not None and (step % cfg.save_every == 0 or step == ppo.steps)) or stop:
                saved = checkpoint(
                    harness, step, policy, critic, tokenizer, optimizer, scheduler, state, kl_control
                )
            if stop:
                bar.close()
                log.close()
                raise StopRequested(
                    f"stopped by {signals.name} after step {step}; saved {saved}; run the same command with "
                    "--resume to continue",
                    128 + (signals.received or 15),
                )
    bar.close()
    final_dir = None
    if start_step >= ppo.steps:
        harness.say(f"the run already reached step {ppo.steps}; raise ppo.steps to continue it")
        final_dir = harness.output_dir / "final"
    elif step == ppo.steps:
        check_finite_weights(policy, str(harness.output_dir / "final"))
        extra = {
            "kind": "ppo",
            "objective": f"PPO, KL penalty {ppo.kl_estimator} (β = {ppo.kl_coef})",
            "training data": f"prompts {config.prompts.path or '(records passed in Python)'}",
            "reward": config.reward.scorer or getattr(scorer, "name", "a scorer object"),
            "critic": critic_source,
        }
        card = model_card(harness.output_dir, config, log.history, extra)
        final_dir = save_final(harness.output_dir, policy, tokenizer, card)
        harness.say(f"saved {final_dir}")
    log.close()
    return PPOResult(harness.output_dir, step, log.history, final_dir)


def check_run(config: RunConfig, has_prompts: bool, has_scorer: bool) -> None:
    """What PPO needs and refuses, before anything loads."""
    rollout, cfg = config.rollout, config.train
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("ppo: runs on one process for now (generation is not sharded); launch it plainly")
    sharded = [
        name
        for name in ("FSDP", "DEEPSPEED")
        if os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"
    ]
    if sharded:  # PPO's own loop prepares nothing through accelerate: the launch config would be ignored
        raise ConfigError(f"ppo: {sharded[0]} launches are not supported yet; launch it plainly")
    if not has_prompts and not config.prompts.path:
        raise ConfigError("prompts.path: required (--prompts FILE)")
    if not has_scorer and not config.reward.scorer:
        raise ConfigError("reward.scorer: required (--reward RM_FOLDER or module:function)")
    if rollout.temperature <= 0 or rollout.top_k or rollout.top_p < 1:
        raise ConfigError(
            "rollout: PPO samples from π at rollout.temperature > 0 with top_k=0 and top_p=1, so that the "
            "log-probs and the KL are those of the distribution sampled; greedy or truncated sampling is not"
        )
    if cfg.grad_accum != 1:
        raise ConfigError(
            "train.grad_accum: PPO splits each mini-batch into forwards of train.batch_size sequences "
            "itself (exactly); leave train.grad_accum at 1"
        )
    if cfg.max_steps is not None:
        raise ConfigError("train.max_steps: PPO counts its steps in ppo.steps")


def update(
    harness: Harness,
    config: RunConfig,
    step: int,
    rollouts: Experience,
    policy: nn.Module,
    critic: nn.Module,
    optimizer: Any,
    scheduler: Any,
    trainable: list[nn.Parameter],
    pad_token_id: int,
    skipped: int,
) -> tuple[dict[str, float], int]:
    """``ppo_epochs`` passes of ``num_mini_batches`` updates over the rollouts. Each update's loss is
    the mean over its mini-batch's tokens, accumulated exactly over forwards of ``train.batch_size``
    sequences. Returns the step's metrics (token means over every update) and the count of updates
    skipped so far (``train.nonfinite=skip``; ``train.max_skipped_steps`` bounds it)."""
    ppo, cfg, accelerator = config.ppo, config.train, harness.accelerator
    count, per_update = len(rollouts.sequences), len(rollouts.sequences) // ppo.num_mini_batches
    sums: dict[str, Tensor] = {}  # on the device, read once at the end of the step
    tokens, grad_norms = 0, []
    for epoch in range(ppo.ppo_epochs):
        generator = torch.Generator().manual_seed(step_seed(cfg.seed, step, epoch + 1))
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, per_update):
            mini = order[start : start + per_update]
            normalizer = float(sum(rollouts.counts[i] for i in mini))
            loss_total = torch.zeros((), device=harness.device)
            for micro in chunks(len(mini), cfg.batch_size):
                index = [mini[i] for i in micro]
                batch = collate_sequences(rollouts.rows(index), pad_token_id).to(harness.device)
                stored = rollouts.tokens(index)
                with accelerator.autocast():
                    ours = policy_tokens(policy, batch, config.rollout.temperature, cfg.logps_chunk_size)
                    predicted = token_values(critic, batch)
                logps = ours.token_logps
                assert logps is not None
                pg = policy_loss(logps, stored["logps"], stored["advantages"], ppo.cliprange)
                vf = value_loss(predicted, stored["values"], stored["returns"], ppo.cliprange_value)
                loss = (pg.loss.sum() + ppo.vf_coef * vf.loss.sum()) / normalizer
                accelerator.backward(loss)
                loss_total += loss.detach()
                log_ratio = (logps - stored["logps"]).detach()
                _add(sums, {
                    "loss/policy_avg": pg.loss.detach().sum(),
                    "loss/value_avg": vf.loss.detach().sum(),
                    "policy/clipfrac_avg": pg.clipped.sum(),
                    "val/clipfrac_avg": vf.clipped.sum(),
                    "policy/approxkl_avg": 0.5 * (log_ratio**2).sum(),
                    "policy/entropy_avg": ours.stats["entropy"].sum(),
                    "val/ratio": log_ratio.exp().sum(),
                })  # fmt: skip
                tokens += logps.numel()
            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf).detach()
            finite, _ = step_verdict(accelerator, grad_norm, loss_total, False)
            if finite:
                optimizer.step()
                grad_norms.append(grad_norm)
            else:
                skipped += 1
                if cfg.nonfinite == "stop" or skipped >= cfg.max_skipped_steps:
                    found = list_checkpoints(harness.output_dir)
                    kept = (
                        f"the last good checkpoint is {found[-1]}"
                        if found
                        else "no checkpoint was written yet"
                    )
                    records = [rollouts.sequences[i].where for i in mini]
                    raise NonFiniteError(
                        nonfinite_message(step, loss_total.item(), grad_norm.item(), records, kept)
                    )
                harness.say(f"step {step}: a non-finite loss or gradient, update skipped ({skipped} so far)")
            learning_rate = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped update has no optimizer.step() before it
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    names = list(sums)
    totals = torch.stack([sums[name] for name in names]).tolist()
    values = {name: total / max(tokens, 1) for name, total in zip(names, totals, strict=True)}
    values["loss"] = values["loss/policy_avg"] + ppo.vf_coef * values["loss/value_avg"]
    values["grad_norm"] = torch.stack(grad_norms).mean().item() if grad_norms else math.nan
    values["learning_rate"] = learning_rate
    return values, skipped


def resume(
    harness: Harness,
    policy: nn.Module,
    critic: nn.Module,
    optimizer: Any,
    scheduler: Any,
    kl_control: KLController,
    geometry: dict[str, int],
    start_digest: str,
) -> int:
    """Policy, critic, optimizer, schedule, RNG and β from the checkpoint being resumed; its step."""
    if harness.resume_from is None:
        return 0
    saved = load_checkpoint(harness.resume_from, policy, optimizer, scheduler, extra_models={"value": critic})
    changed = {k: (saved.get(k), v) for k, v in geometry.items() if saved.get(k) != v}
    if changed:
        raise ConfigError(
            f"ppo: {harness.resume_from} was trained with other rollout geometry ({changed}, saved -> now); "
            "resume with the same ppo.rollouts_per_step, ppo_epochs and num_mini_batches"
        )
    if saved.get("start_digest") != start_digest:
        raise CheckpointError(
            f"{harness.resume_from}: this run starts from other weights than the run being resumed; "
            "its reference would differ"
        )
    kl_control.value = float(saved["kl_coef"])
    harness.say(
        f"resumed from {harness.resume_from} at step {saved['step']} (kl_coef {kl_control.value:.6g})"
    )
    return int(saved["step"])


def checkpoint(
    harness: Harness,
    step: int,
    policy: nn.Module,
    critic: nn.Module,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    kl_control: KLController,
) -> Path:
    """``checkpoint-<step>``: the policy (loadable as it is), the critic in ``value/``, and the state."""
    path = harness.output_dir / f"checkpoint-{step:07d}"
    check_finite_weights(policy, str(path))
    check_finite_weights(critic, str(path / "value"))
    return save_checkpoint(
        harness.output_dir,
        step,
        policy,
        tokenizer,
        optimizer,
        scheduler,
        {**state, "kl_coef": kl_control.value},
        harness.cfg.save_total_limit,
        extra_models={"value": critic},
    )


def _add(sums: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    for name, value in values.items():
        sums[name] = sums[name] + value.float() if name in sums else value.float()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
