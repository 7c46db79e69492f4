"""The harness: what every kind of training needs, around a recipe's step.

    harness = Harness(config)                 accelerator, seed, trackers checked
    harness.decide_start()                    after the recipe validated its data: a fresh run or a resume
    harness.fit(models, steps)                the one run loop, for every recipe:

    optimizer and schedule over every update; the checkpoint resumed (weights, optimizer, schedule,
    RNG, the step source's position and state)
    for each step:
        steps.step(k)                         the recipe's work; each optimizer update through one
                                              shared function (clip, verdict, step, schedule)
        every log_every: metrics (one host sync); eval_every: evaluate; save_every: checkpoint;
        a signal: checkpoint and stop
    final/ (with a model card)

A recipe says what a step computes (a :class:`~.task.StepSource`: :class:`~.steps.ExampleSteps`
over a :class:`~.task.Task` for the DPO family, KTO, SFT and reward models; PPO's own); the harness
owns how the run goes: the accelerator, seeding, output-folder rules, resume, checkpoints,
signals, the non-finite guard, metrics, evaluation cadence and the final save. It runs
single-process or under ``accelerate launch`` / ``torchrun`` unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import RunConfig, to_dict, validate
from ..data.outputs import (
    FolderLock,
    check_kind,
    check_not_input,
    check_output_dir,
    config_inputs,
    held,
    record_kind,
)
from ..errors import CheckpointError, ConfigError
from . import sharding
from .bnb import build_optimizer, check_bitsandbytes
from .card import model_card
from .checkpoint import (
    CheckpointContents,
    check_free_space,
    checkpoint_name,
    clear_previous_run,
    load_checkpoint,
    load_models,
    plan_output_dir,
    recover_stray,
    save_checkpoint,
    save_final,
)
from .guard import Signals, StopRequested, check_finite_weights
from .task import Models, StepPlan, StepSource, TrainResult
from .tracking import MetricsLog, Progress, Window, check_trackers, config_lines, console_line, console_values
from .update import Optimization, Updater


class Harness:
    """``kind`` names the run (``train``, ``sft``, ``rm``, ``ppo``): its output folder holds that
    kind of run only."""

    def __init__(self, config: RunConfig, kind: str = "train"):
        validate(config)
        self.config, self.kind = config, kind
        self.cfg = cfg = config.train
        self.trackers = check_trackers(cfg.report_to)
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed)
        self.is_main = self.accelerator.is_main_process
        sharding.check_distributed(self.accelerator)
        check_bitsandbytes(config, self.accelerator, self.say)
        set_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        # The output, checked before anything loads: writable, none of the inputs, no other kind of run.
        check_output_dir(self.output_dir)
        check_not_input(self.output_dir, config_inputs(config), "train.output_dir")
        check_kind(self.output_dir, kind, "train.output_dir")
        self._earlier_run: list[Path] = []
        self.device = self.accelerator.device
        self.resume_from: Path | None = None
        self.lock = FolderLock(self.output_dir, kind, "train.output_dir")
        if not held():  # a run inside another (an online round, a pipeline stage) leaves this to it
            self.say(config_lines(config))

    def say(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)

    def refuse_split_steps(self, reason: str) -> None:
        """For a loss whose per-example values depend on the whole batch (``reason`` says how):
        a step split into micro-batches or across processes would change it."""
        if self.cfg.grad_accum > 1 or self.accelerator.num_processes > 1:
            raise ConfigError(
                f"train.grad_accum: {reason}, so splitting a step into micro-batches or across processes "
                "changes the loss; use train.grad_accum=1 on one process (raise train.batch_size instead)"
            )

    def decide_start(self) -> None:
        """Take the output folder (a second run into it is refused until this one ends), and decide
        between a fresh run and a resume, once the data is known good. Nothing of an earlier run is
        removed here: that waits until the models have loaded (``fit``)."""
        if self.is_main:
            self.lock.acquire()
            check_kind(self.output_dir, self.kind, "train.output_dir")  # again, now that the folder is ours
            recover_stray(self.output_dir)
        self.resume_from, self._earlier_run = plan_output_dir(
            self.output_dir, self.cfg.resume, self.cfg.overwrite
        )
        if self.resume_from is not None and not self._resumed_here:
            check_kind(self.resume_from.parent, self.kind, "train.resume")
        if self.cfg.resume and self.resume_from is None:
            self.say(f"resume: no checkpoint in {self.output_dir}; starting from the beginning")

    @property
    def _resumed_here(self) -> bool:
        """Resumed from a checkpoint of this folder (not from another run's, into a new folder)."""
        return self.resume_from is not None and self.resume_from.resolve().parent == self.output_dir.resolve()

    def _prepare_output_dir(self, models: Models, trainable: list[nn.Parameter]) -> None:
        """The models loaded: now an earlier run's files may go, if there is room for a checkpoint."""
        if self.is_main:
            saved = [models.model, *models.extra_models.values()]
            weights = sum(sharding.numel(p) * p.element_size() for m in saved for p in m.parameters())
            moments = 2 * 4 * sum(sharding.numel(p) for p in trainable)  # AdamW's two fp32 moments
            check_free_space(self.output_dir, int(1.1 * (weights + moments)))
            clear_previous_run(self._earlier_run)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record_kind(self.output_dir, self.kind)
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop

    def fit(self, models: Models, steps: StepSource, stop_after: int | None = None) -> TrainResult:
        """Train ``models.module`` step by step as ``steps`` says, and save ``models``.
        ``stop_after`` ends the run after that many steps as if interrupted (checkpoints and
        resume are tested with it)."""
        cfg, plan = self.cfg, steps.plan
        # plan: optimizer and schedule over every update, the checkpoint resumed, the output folder
        optimization, start_step, tokens_seen = self._prepare(models, steps)
        last_step = min(plan.total_steps, stop_after) if stop_after else plan.total_steps
        progress = self._progress(plan, start_step, tokens_seen)
        wrapped, step = optimization.wrapped, start_step
        wrapped.train()
        # loop
        with contextlib.closing(progress):
            with Signals() as signals:
                update = Updater(self.accelerator, optimization, cfg, signals, self.output_dir, self.say)
                for step in range(start_step + 1, last_step + 1):
                    steps.step(step, wrapped, update, progress.window)
                    progress.bar.update(1)
                    if step % cfg.log_every == 0 or step == last_step or update.stop:
                        self._log(step, steps, update, progress)
                    if cfg.eval_every and step % cfg.eval_every == 0 and not update.stop:
                        self._evaluate(step, steps, wrapped, progress.log)
                    # The last step is saved too: a finished run can be extended with more steps and --resume.
                    due = cfg.save_every is not None and (
                        step % cfg.save_every == 0 or step == plan.total_steps
                    )
                    if due or update.stop:
                        state = {"total_steps": plan.total_steps, "num_tokens": progress.tokens_seen}
                        hf_state = self._trainer_state(step, steps, progress)
                        saved = self._checkpoint(step, optimization, models, state | steps.state(), hf_state)
                    if update.stop:
                        raise StopRequested(
                            f"stopped by {signals.name or 'a signal on another process'} after step {step}; "
                            f"saved {saved}; run the same command with --resume to continue",
                            128 + (signals.received or 15),
                        )
            progress.bar.close()
            # save
            final_dir = self._finish(step, start_step, optimization, models, steps, progress.log)
        # Every rank leaves together (the main one was saving). The group stays up (a script may
        # train again); the command line ends it at its exit (distributed.close_process_group).
        self.accelerator.wait_for_everyone()
        self.lock.release()
        return TrainResult(self.output_dir, step, progress.log.history, final_dir)

    # ------------------------------------------------------------------ pieces of the loop

    def _prepare(self, models: Models, steps: StepSource) -> tuple[Optimization, int, float]:
        """The optimizer and schedule, the module prepared, the checkpoint resumed and the output
        folder made ready; returns them with the step and tokens to start from."""
        plan = steps.plan
        sharding.check_and_plan(self.accelerator, models.model, self.cfg)
        optimizer, scheduler = self.optimizer_for(
            sharding.trainable_parameters(models.module), plan.total_steps * plan.updates_per_step
        )
        if self.resume_from is not None:  # into the whole models, before any sharding
            load_models(self.resume_from, models.model, models.extra_models)
        # The scheduler stays out of prepare(): accelerate would step it once per process.
        wrapped, optimizer = self.accelerator.prepare(models.module, optimizer)
        optimization = Optimization(wrapped, sharding.trainable_parameters(wrapped), optimizer, scheduler)
        start_step, tokens_seen = self._resume(optimization, models, steps)
        self._prepare_output_dir(models, optimization.trainable)
        return optimization, start_step, tokens_seen

    def _progress(self, plan: StepPlan, start_step: int, tokens_seen: float) -> Progress:
        """The window of steps since the last log, the log (``metrics.jsonl``, trackers, and a plain
        line per logged step where no terminal shows the bar), and the progress bar."""
        bar = tqdm(
            total=plan.total_steps, initial=start_step, desc="train", disable=None if self._bar else True
        )
        plain = console_line(self.say, plan.console, plan.unit, plan.total_steps)
        log = MetricsLog(
            self.output_dir,
            self.trackers,
            to_dict(self.config),
            start_step,
            self._resumed_here,
            self.is_main,
            console=plain if self.cfg.progress and bar.disable else None,
        )
        return Progress(Window(self.device), log, bar, tokens_seen)

    def _log(self, step: int, steps: StepSource, update: Updater, progress: Progress) -> None:
        """The steps since the last log, averaged (one host sync), with the values as they are now."""
        plan = steps.plan
        values, tokens = progress.window.read(self.accelerator, steps.summarize, plan.unit)
        progress.tokens_seen += tokens
        values |= {"learning_rate": update.learning_rate, "num_tokens": progress.tokens_seen}
        values |= steps.current(step)
        if update.skipped:
            values[plan.skipped_metric] = float(update.skipped)
        progress.log.log(step, values)
        progress.bar.set_postfix(console_values(plan.console, values))

    def _finish(
        self,
        step: int,
        start_step: int,
        optimization: Optimization,
        models: Models,
        steps: StepSource,
        log: MetricsLog,
    ) -> Path | None:
        """The closing evaluation and ``final/`` (with its model card) once the last step is done."""
        cfg, total_steps = self.cfg, steps.plan.total_steps
        if start_step >= total_steps:  # resumed a finished run: nothing to redo
            self.say(
                f"the run already reached step {total_steps}; raise {steps.plan.steps_setting} to continue it"
            )
            return self.output_dir / "final"
        if step < total_steps:  # stopped early (stop_after)
            return None
        if not (cfg.eval_every and step % cfg.eval_every == 0):
            self._evaluate(step, steps, optimization.wrapped, log)
        weights = sharding.full_weights(self.accelerator, optimization.wrapped)  # every process gathers
        if not self.is_main:
            return None
        check_finite_weights(models.model, str(self.output_dir / "final"), weights)
        text = model_card(self.output_dir, self.config, log.history, models.card)
        final_dir = save_final(self.output_dir, models.model, models.tokenizer, text, weights)
        self.say(f"saved {final_dir}")
        return final_dir

    def _evaluate(self, step: int, steps: StepSource, module: nn.Module, log: MetricsLog) -> None:
        values = steps.evaluate(module)
        if values:
            log.log(step, values)

    def optimizer_for(self, trainable: list[nn.Parameter], total_updates: int) -> tuple[Any, Any]:
        """``train.optimizer`` (AdamW, 8-bit or not) over the trainable parameters, and the
        learning-rate schedule with its warmup."""
        cfg = self.cfg
        optimizer = build_optimizer(trainable, cfg, self.device)
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_updates)
        schedule = "constant_with_warmup" if cfg.scheduler == "constant" and warmup else cfg.scheduler
        scheduler = get_scheduler(
            schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_updates
        )
        return optimizer, scheduler

    @property
    def _bar(self) -> bool:
        return self.cfg.progress and self.is_main

    def _resume(self, optimization: Optimization, models: Models, steps: StepSource) -> tuple[int, float]:
        """Optimizer, schedule, RNG and the step source's state of the checkpoint resumed (weights
        came before); (step, tokens)."""
        if self.resume_from is None:
            steps.start(0, None, {})
            return 0, 0.0
        opt = optimization
        load_optimizer = sharding.optimizer_loader(self.accelerator, opt.wrapped, opt.optimizer)
        saved = load_checkpoint(self.resume_from, None, opt.optimizer, opt.scheduler, load_optimizer)
        steps.start(saved["step"], self.resume_from, saved)
        if saved.get("start_digest", models.start_digest) != models.start_digest:
            raise CheckpointError(
                f"{self.resume_from}: this run starts from other weights than the run being resumed (a changed "
                "hub revision, or a model object that was already trained); its reference would differ"
            )
        self.say(f"resumed from {self.resume_from} at step {saved['step']}")
        return saved["step"], float(saved.get("num_tokens", 0.0))

    def _trainer_state(self, step: int, steps: StepSource, progress: Progress) -> dict[str, Any]:
        """``trainer_state.json`` as the Hugging Face Trainer writes it (its every field, and no other:
        ``TrainerState.load_from_json`` refuses unknown keys); preftune's own state is beside it."""
        cfg, total = self.cfg, steps.plan.total_steps
        epochs = steps.current(total).get("epoch")
        return {
            "best_global_step": None,
            "best_metric": None,
            "best_model_checkpoint": None,
            "epoch": steps.current(step).get("epoch", 0.0),
            "eval_steps": cfg.eval_every,
            "global_step": step,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": [row for row in progress.log.log_history if row["step"] <= step],
            "logging_steps": cfg.log_every,
            "max_steps": total,
            "num_input_tokens_seen": int(progress.tokens_seen),
            "num_train_epochs": math.ceil(epochs) if epochs is not None else 1,
            "save_steps": cfg.save_every,
            "stateful_callbacks": {},
            "total_flos": 0.0,
            "train_batch_size": cfg.batch_size,
            "trial_name": None,
            "trial_params": None,
        }

    def _checkpoint(
        self,
        step: int,
        optimization: Optimization,
        models: Models,
        state: dict[str, Any],
        trainer_state: dict[str, Any],
    ) -> Path:
        """``checkpoint-<step>``: the models, the optimizer, the schedule, ``state`` (preftune's) and
        ``trainer_state`` (the Hugging Face Trainer's)."""
        path = self.output_dir / checkpoint_name(step)
        wrapped = optimization.wrapped
        weights = sharding.full_weights(self.accelerator, wrapped)  # sharded: every process gathers
        moments = sharding.optimizer_state(self.accelerator, wrapped, optimization.optimizer, path)
        if self.is_main:
            check_finite_weights(models.model, str(path), weights)
            for name, extra in models.extra_models.items():
                check_finite_weights(extra, str(path / name))
            contents = CheckpointContents(
                models.model,
                models.tokenizer,
                optimization.optimizer,
                optimization.scheduler,
                {**state, "start_digest": models.start_digest},
                models.extra_models,
                weights,
                moments,
                trainer_state,
            )
            save_checkpoint(self.output_dir, step, contents, self.cfg.save_total_limit)
        self.accelerator.wait_for_everyone()
        return path
