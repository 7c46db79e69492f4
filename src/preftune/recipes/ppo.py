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
        (the harness) log; checkpoint every train.save_every steps: policy, critic, optimizer,
        schedule, RNG, β, step
    final/ <- the policy, saved as `train` saves it

The harness runs the loop (:meth:`Harness.fit`: progress, metrics, signals and the non-finite guard,
checkpoints, ``final/``), as for every recipe; PPO brings its step (:class:`PPOSteps`): a rollout
phase, then its updates, each through the update every recipe uses (clip, verdict, optimizer step,
schedule). A checkpoint holds the critic in ``value/`` and β in its trainer state.

With a monitor (``reward.monitor``) every logged row is a point of the overoptimization monitor
(:mod:`preftune.evaluation.monitor`): the reward, the monitor's reward and the KL, averaged over the
row's steps. The policy at the end of the row the monitor scores best is kept in
``best-by-monitor/``; with ``reward.stop_on_overoptimization`` the run stops on the monitor's
warning and ``final/`` is that policy.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..config import RunConfig
from ..data.files import read_jsonl, write_json
from ..data.layouts import collate_sequences
from ..data.outputs import releases_locks
from ..data.prompts import Prompt, read_prompts
from ..engine import Harness, Models, StepPlan, TrainResult, Updater, Window, data_stream
from ..engine.checkpoint import save_final
from ..errors import ConfigError
from ..evaluation.monitor import OveroptimizationMonitor
from ..generation.rollout import eos_ids
from ..generation.scoring import Scorer
from ..generation.vllm_engine import check_engine, rollout_factory
from ..losses.ppo import KLController, policy_loss, value_loss
from ..model.load import load_model, prepare_for_training
from ..model.reference import reference_model, weights_digest
from ..model.reward_head import token_values
from .common import tokenizer_for
from .online import RolloutFactory, check_monitor, rewards_of
from .ppo_experience import (
    MONITOR_SEM,
    Experience,
    PPOModels,
    build_critic,
    chunks,
    collect,
    policy_tokens,
    step_seed,
)

CONSOLE = (
    "objective/scores",
    "objective/scores_disagreement",  # an ensemble's members' spread; a run with one reward has none
    "objective/monitor_scores",  # with a monitor
    "objective/kl",
    "loss/value_avg",
)
GEOMETRY = ("rollouts_per_step", "ppo_epochs", "num_mini_batches")
"""What a resumed run must keep: the data position and the schedule count rollouts and updates."""


@releases_locks
def train_ppo(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    prompts: Any = None,
    scorer: Scorer | None = None,
    rollout_for: RolloutFactory | None = None,
    stop_after: int | None = None,
    monitor: Scorer | None = None,
) -> TrainResult:
    """``config.ppo.steps`` PPO steps from ``config.model`` (or ``model``, trained in place) on
    ``config.prompts`` (or the records given), rewarded by ``config.reward`` (or ``scorer``) and
    watched by ``reward.monitor`` (or ``monitor``). ``rollout_for(policy)`` gives the sampler
    (default: transformers). ``stop_after`` ends the run after that many steps, as if interrupted."""
    # check
    harness, ppo = Harness(config, "ppo"), config.ppo
    check_run(config, prompts is not None, scorer is not None)
    check_monitor(config, monitor is not None)
    if rollout_for is None:
        check_engine(config.rollout)

    # data: the prompts, the reward and its monitor
    tokenizer = tokenizer_for(config, tokenizer)
    source = prompts if prompts is not None else config.prompts.path
    prompt_rows = read_prompts(source, config.data, config.prompts.split, tokenizer, config.prompts.limit)
    scorer, monitor = rewards_of(config, scorer, monitor, allow_unscored=False)
    harness.decide_start()

    # load: the policy, its reference and the critic, both taken before LoRA wraps the policy (with
    # LoRA the reference is None: the policy with its adapters off)
    policy = model if model is not None else load_model(config.model)
    start_digest = weights_digest(policy)
    reference = reference_model(config, policy)
    critic, critic_source = build_critic(config, policy, scorer, tokenizer, harness.say)
    policy = prepare_for_training(policy, config.model).to(harness.device)
    critic = prepare_for_training(critic, config.model, task_type="SEQ_CLS").to(harness.device)
    if reference is not None:
        reference.to(harness.device)
    make_rollout = rollout_for or rollout_factory(
        config.rollout,
        config.model.name_or_path,
        tokenizer.pad_token_id,
        eos_ids(policy, tokenizer),
        config.train.progress,
    )
    harness.say(
        f"ppo: {len(prompt_rows)} prompts, {ppo.rollouts_per_step} rollouts a step, {ppo.steps} steps; "
        f"kl_coef {ppo.kl_coef}{f' -> target {ppo.target_kl}' if ppo.target_kl else ''} ({ppo.kl_estimator}); "
        f"critic: {critic_source}; reward: {getattr(scorer, 'name', 'a scorer object')}"
    )

    # loop, then final/: the harness (or, stopped by the monitor, the policy it scored best)
    parts = PPOModels(policy, critic, reference, make_rollout(policy), scorer, tokenizer, monitor)
    card = {
        "kind": "ppo",
        "objective": f"PPO, KL penalty {ppo.kl_estimator} (β = {ppo.kl_coef})",
        "training data": f"prompts {config.prompts.path or '(records passed in Python)'}",
        "reward": config.reward.scorer or getattr(scorer, "name", "a scorer object"),
        "critic": critic_source,
    }
    # One module holds what the optimizer trains (policy and critic, as one AdamW); the policy is
    # saved at a checkpoint's top and in final/, the critic in value/.
    trained = nn.ModuleDict({"policy": policy, "value": critic})
    models = Models(trained, policy, tokenizer, {"value": critic}, start_digest, card)
    steps = PPOSteps(config, prompt_rows, parts, harness.accelerator)
    try:
        result = harness.fit(models, steps, stop_after)
    except StoppedByMonitor as stop:
        result = TrainResult(harness.output_dir, stop.step, read_jsonl(harness.output_dir / "metrics.jsonl"))
    if steps.stopped and steps.watcher is not None:
        result.final_dir = final_from_best(harness.output_dir, steps.watcher.best(), harness.say)
    return result


class StoppedByMonitor(Exception):
    """Ends PPO's loop at the start of the step after the monitor's warning (its row is logged)."""

    def __init__(self, step: int):
        super().__init__(f"stopped by the overoptimization monitor after step {step}")
        self.step = step


BEST = "best-by-monitor"
"""The folder, in the output folder, holding the policy the monitor scored best so far."""


def save_best(output: Path, policy: nn.Module, tokenizer: Any, point: dict[str, Any]) -> None:
    """``OUTPUT/best-by-monitor/``: ``policy`` as ``final/`` saves it (LoRA merged), and the point
    (``monitor.json``). Replaced whole: a crash leaves the old one or the new one (the harness puts
    back a ``.old-`` folder and drops a ``.tmp-`` one when the run resumes)."""
    staging = output / f".tmp-{BEST}"
    shutil.rmtree(staging, ignore_errors=True)
    folder = save_final(staging, policy, tokenizer)
    write_json(folder / "monitor.json", point)
    target, old = output / BEST, output / f".old-{BEST}"
    if target.exists():
        os.replace(target, old)
    os.replace(folder, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def final_from_best(output: Path, best: dict[str, Any], say: Any) -> Path:
    """``final/`` <- ``best-by-monitor/``, with a line in its card saying so."""
    staging = output / f".tmp-{BEST}-final"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(output / BEST, staging)
    card = staging / "README.md"
    note = (
        f"\nStopped on overoptimization: this is the policy at step {best['at']}, the logged step the "
        f"monitor scored best ({best['monitor']:+.4f}, KL {best['kl']:.3f} nats).\n"
    )
    card.write_text((card.read_text() if card.exists() else "") + note, encoding="utf-8")
    final, old = output / "final", output / ".old-final"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    say(f"saved {final} (the policy of step {best['at']}, best by the monitor)")
    return final


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
    # PPO's rollouts and updates call the policy and the critic themselves, not through the forward
    # of a sharded wrapper: a sharded launch would not shard them.
    if sharded:
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


class PPOSteps:
    """PPO's steps for the harness's loop: step k collects experience, then makes its
    ``ppo_epochs × num_mini_batches`` optimizer updates on it; β moves after the step."""

    def __init__(self, config: RunConfig, prompts: list[Prompt], models: PPOModels, accelerator: Accelerator):
        ppo = config.ppo
        self.config, self.prompts, self.models, self.accelerator = config, prompts, models, accelerator
        self.plan = StepPlan(
            ppo.steps,
            updates_per_step=ppo.ppo_epochs * ppo.num_mini_batches,
            steps_setting="ppo.steps",
            unit="rollouts",
            console=CONSOLE,
            skipped_metric="skipped_updates",
        )
        self.kl_control = KLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
        self.kl_used = ppo.kl_coef
        """β of the last step's rewards (the controller's value has moved on since)."""
        self.stream = data_stream(len(prompts), config.train.seed, config.train.shuffle)
        reward = config.reward
        self.watcher = None
        if models.monitor is not None:
            self.watcher = OveroptimizationMonitor(
                reward.monitor_patience, reward.stop_on_overoptimization, "step", reward.monitor_noise_z
            )
        self.last_step, self.stopped = 0, False
        self.verdict: dict[str, float] = {}
        self.monitor_variances: list[float] = []
        """The squared standard errors of the monitor means of the steps since the last logged row."""

    def geometry(self) -> dict[str, int]:
        return {name: getattr(self.config.ppo, name) for name in GEOMETRY}

    def state(self) -> dict[str, Any]:
        watched = self.watcher.state() if self.watcher is not None else {}
        return {**self.geometry(), "kl_coef": self.kl_control.value, **watched}

    def start(self, step: int, checkpoint: Path | None, saved: dict[str, Any]) -> None:
        if checkpoint is not None:
            changed = {k: (saved.get(k), v) for k, v in self.geometry().items() if saved.get(k) != v}
            if changed:
                raise ConfigError(
                    f"ppo: {checkpoint} was trained with other rollout geometry ({changed}, saved -> now); "
                    "resume with the same ppo.rollouts_per_step, ppo_epochs and num_mini_batches"
                )
            self.kl_control.value = float(saved["kl_coef"])
            if self.watcher is not None:
                self.watcher.restore(saved)
        elif self.watcher is not None:  # a fresh run: an earlier run's best is not this run's
            shutil.rmtree(Path(self.config.train.output_dir) / BEST, ignore_errors=True)
        for _ in range(step * self.config.ppo.rollouts_per_step):
            next(self.stream)

    def step(self, step: int, module: nn.Module, update: Updater, window: Window) -> None:
        """Collect step ``step``'s experience, make its updates, then move β. (``module`` holds the
        policy and the critic; on PPO's one process it is not wrapped, so they are called directly.)"""
        if self.stopped:  # the monitor's warning at the last logged row
            raise StoppedByMonitor(step - 1)
        self.last_step = step
        rollouts = self.config.ppo.rollouts_per_step
        prompts = [self.prompts[next(self.stream)] for _ in range(rollouts)]
        experience = collect(self.config, step, prompts, self.models, self.kl_control.value, self.accelerator)
        values = self.updates(step, experience, update)
        self.kl_used = self.kl_control.value
        self.kl_control.update(experience.metrics["objective/kl"], rollouts)
        sem = experience.metrics.pop(MONITOR_SEM, None)
        if sem is not None:
            self.monitor_variances.append(sem**2)
        window.add_step(values | experience.metrics, rollouts, sum(experience.counts))

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """A logged row; with a monitor, its verdict on the row (and the best policy kept)."""
        variances, self.monitor_variances = self.monitor_variances, []
        if self.watcher is not None and "objective/monitor_scores" in means:
            at = self.last_step
            # The row's monitor is the mean of its steps' means: its variance, theirs over k².
            sem = math.sqrt(sum(variances)) / len(variances) if variances else None
            verdict = self.watcher.add(
                at, means["objective/scores"], means["objective/monitor_scores"], means["objective/kl"], sem
            )
            if verdict.is_best:
                save_best(Path(self.config.train.output_dir), self.models.policy, self.models.tokenizer,
                          verdict.best)  # fmt: skip
            if verdict.overoptimized:
                print(f"step {at}: {verdict.message}", flush=True)
            self.stopped = verdict.stop
            self.verdict = {
                "monitor/overoptimized": float(verdict.overoptimized),
                "monitor/best_step": float(verdict.best["at"]),
            }
        return means

    def current(self, step: int) -> dict[str, float]:
        return {
            "episode": step * self.config.ppo.rollouts_per_step,
            "objective/kl_coef": self.kl_used,
            **self.verdict,
        }

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        return {}  # PPO's measure is the reward of its rollouts, logged every step

    def updates(self, step: int, experience: Experience, update: Updater) -> dict[str, float]:
        """``ppo_epochs`` passes of ``num_mini_batches`` updates over the experience, each on a seeded
        shuffle and applied by ``update`` (the harness's, as every recipe's); returns the step's
        metrics, token means over every update (``grad_norm``: the mean over its finite updates)."""
        ppo, seed = self.config.ppo, self.config.train.seed
        count = len(experience.sequences)
        per_update = count // ppo.num_mini_batches
        sums: dict[str, Tensor] = {}  # on the device, read once at the end of the step
        tokens, grad_norms = 0, []
        for epoch in range(ppo.ppo_epochs):
            generator = torch.Generator().manual_seed(step_seed(seed, step, epoch + 1))
            order = torch.randperm(count, generator=generator).tolist()
            for start in range(0, count, per_update):
                mini = order[start : start + per_update]
                loss, mini_tokens = self.mini_batch(experience, mini, sums)
                tokens += mini_tokens
                finite, grad_norm = update(step, loss, [experience.sequences[i].where for i in mini])
                if finite:
                    grad_norms.append(grad_norm)
        names = list(sums)
        totals = torch.stack([sums[name] for name in names]).tolist()
        values = {name: total / max(tokens, 1) for name, total in zip(names, totals, strict=True)}
        values["loss"] = values["loss/policy_avg"] + ppo.vf_coef * values["loss/value_avg"]
        values["grad_norm"] = torch.stack(grad_norms).mean().item() if grad_norms else math.nan
        return values

    def mini_batch(
        self, experience: Experience, mini: list[int], sums: dict[str, Tensor]
    ) -> tuple[Tensor, int]:
        """Forward and backward of the mini-batch ``mini`` in forwards of ``train.batch_size``
        sequences; its loss is the mean over its tokens, accumulated exactly:

            loss = Σ_tokens (clipped policy loss + vf_coef · clipped value loss) / tokens of the mini-batch

        Adds the token sums of its metrics to ``sums``; returns its loss (detached) and its tokens."""
        ppo, cfg, accelerator = self.config.ppo, self.config.train, self.accelerator
        policy, critic = self.models.policy, self.models.critic
        normalizer = float(sum(experience.counts[i] for i in mini))
        loss_total, tokens = torch.zeros((), device=accelerator.device), 0
        for micro in chunks(len(mini), cfg.batch_size):
            index = [mini[i] for i in micro]
            batch = collate_sequences(experience.rows(index), self.models.tokenizer.pad_token_id)
            batch = batch.to(accelerator.device)
            stored = experience.tokens(index)
            with accelerator.autocast():
                ours = policy_tokens(policy, batch, self.config.rollout.temperature, cfg.logps_chunk_size)
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
        return loss_total, tokens


def _add(sums: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    for name, value in values.items():
        sums[name] = sums[name] + value.float() if name in sums else value.float()
