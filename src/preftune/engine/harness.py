"""The harness: what every kind of training needs, around a recipe's loss.

    harness = Harness(config)          accelerator, seed, trackers checked
    harness.decide_start()         after the recipe validated its data: a fresh run or a resume
    harness.fit(module, model, task)   the loop:

    for each optimizer step:
        take the step's examples from a seeded stream (resuming needs only the step number)
        for each micro-batch of this process:
            losses, metrics = task.loss(module, batch)               per-example, [B]
            backward(sum(losses) / examples per optimizer step)     exact accumulation
        clip, optimizer step, schedule
        every log_every: metrics (one host sync); eval_every: evaluate; save_every: checkpoint
    final/ (with a model card)

A recipe says what is computed (:class:`Task`); the harness owns how it is run: the
accelerator, seeding, output-folder rules, resume (weights, optimizer, scheduler, RNG,
data position), checkpoints, accumulation, clipping, schedule, metrics and evaluation.
It runs single-process or under ``accelerate launch`` / ``torchrun`` unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import RunConfig, to_dict, validate
from ..errors import CheckpointError, ConfigError
from . import sharding
from .card import model_card
from .checkpoint import (
    check_free_space,
    check_output_dir,
    clear_previous_run,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    plan_output_dir,
    recover_stray,
    save_checkpoint,
    save_final,
)
from .guard import (
    NonFiniteError,
    Signals,
    StopRequested,
    check_finite_weights,
    nonfinite_message,
    step_verdict,
)
from .task import Task, TrainResult, data_stream
from .tracking import MetricsLog, MetricSums, check_trackers, console_line, read_window


class Harness:
    def __init__(self, config: RunConfig):
        validate(config)
        self.config = config
        self.cfg = cfg = config.train
        self.trackers = check_trackers(cfg.report_to)
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed)
        sharding.check_distributed(self.accelerator)
        set_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        check_output_dir(self.output_dir)
        self._earlier_run: list[Path] = []
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.resume_from: Path | None = None

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
        """Decide between a fresh run and a resume, once the data is known good. Nothing of an
        earlier run is removed here: that waits until the models have loaded (``fit``)."""
        if self.is_main:
            recover_stray(self.output_dir)
        self.resume_from, self._earlier_run = plan_output_dir(
            self.output_dir, self.cfg.resume, self.cfg.overwrite
        )
        if self.cfg.resume and self.resume_from is None:
            self.say(f"resume: no checkpoint in {self.output_dir}; starting from the beginning")

    def prepare_output_dir(self, model: nn.Module, trainable: list[nn.Parameter]) -> None:
        """The models loaded: now an earlier run's files may go, if there is room for a checkpoint."""
        if self.is_main:
            weights = sum(sharding.numel(p) * p.element_size() for p in model.parameters())
            moments = 2 * 4 * sum(sharding.numel(p) for p in trainable)  # AdamW's two fp32 moments
            check_free_space(self.output_dir, int(1.1 * (weights + moments)))
            clear_previous_run(self._earlier_run)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=2))
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        module: nn.Module,
        model: nn.Module,
        tokenizer: Any,
        task: Task,
        *,
        start_digest: str = "",
        card: dict[str, Any] | None = None,
        stop_after: int | None = None,
    ) -> TrainResult:
        """Train ``module`` (whose forward the task's loss calls) and save ``model`` (the
        transformers model inside it). ``stop_after`` ends the run after that many optimizer
        steps as if interrupted (checkpoints and resume are tested with it)."""
        cfg, accelerator = self.cfg, self.accelerator
        per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(task.examples) / per_step))
        sharding.check_and_plan(accelerator, model, cfg)
        optimizer, scheduler = self.optimizer_for(sharding.trainable_parameters(module), total_steps)
        if self.resume_from is not None:  # into the whole model, before any sharding
            load_weights(self.resume_from, model)
        # The scheduler stays out of prepare(): accelerate would step it once per process.
        wrapped, optimizer = accelerator.prepare(module, optimizer)
        trainable = sharding.trainable_parameters(wrapped)

        state = {"examples_per_step": per_step, "total_steps": total_steps, "start_digest": start_digest}
        start_step, tokens_seen = self._resume(wrapped, optimizer, scheduler, state, task.unit)
        self.prepare_output_dir(model, trainable)
        stream = data_stream(len(task.examples), cfg.seed, cfg.shuffle)
        for _ in range(start_step * per_step):
            next(stream)
        bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=None if self._bar else True)
        log = MetricsLog(
            self.output_dir,
            self.trackers,
            to_dict(self.config),
            start_step,
            self.resume_from is not None,
            self.is_main,
            console=console_line(self.say, task.console, task.unit, total_steps)
            if cfg.progress and bar.disable
            else None,
        )
        window = MetricSums(self.device)
        grad_norms: list[Tensor] = []
        skipped = 0
        window_start = time.perf_counter()
        last_step = min(total_steps, stop_after) if stop_after else total_steps
        wrapped.train()
        step = start_step
        with Signals() as signals:
            for step in range(start_step + 1, last_step + 1):
                order = [next(stream) for _ in range(per_step)]
                step_sums, records, grad_norm = self._accumulate(wrapped, task, order, trainable)
                finite, stop = step_verdict(
                    accelerator, grad_norm, step_sums.sums["loss"], bool(signals.received)
                )
                learning_rate = scheduler.get_last_lr()[0]
                if finite:
                    optimizer.step()
                    window.absorb(step_sums)
                    if cfg.max_grad_norm is not None:
                        grad_norms.append(grad_norm)
                else:
                    skipped += 1
                    if cfg.nonfinite == "stop" or skipped >= cfg.max_skipped_steps:
                        loss = step_sums.sums["loss"].item()
                        kept = self._last_checkpoint_note()
                        raise NonFiniteError(nonfinite_message(step, loss, grad_norm.item(), records, kept))
                    self.say(f"step {step}: non-finite loss or gradient, step skipped ({skipped} so far)")
                with warnings.catch_warnings():  # a skipped step has no optimizer.step() before it
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)

                if step % cfg.log_every == 0 or step == last_step or stop:
                    elapsed = time.perf_counter() - window_start
                    values, tokens = read_window(window, accelerator, task, grad_norms, elapsed)
                    tokens_seen += tokens
                    values.update(
                        learning_rate=learning_rate,
                        num_tokens=tokens_seen,
                        epoch=step * per_step / len(task.examples),
                        **({"skipped_steps": float(skipped)} if skipped else {}),
                    )
                    log.log(step, values)
                    bar.set_postfix(
                        {label: f"{values[name]:.4g}" for label, name in task.console if name in values}
                    )
                    grad_norms = []
                    window_start = time.perf_counter()
                if task.eval_examples and cfg.eval_every and step % cfg.eval_every == 0 and not stop:
                    log.log(step, self.evaluate(wrapped, task))
                # The last step is saved too: a finished run can be extended with more steps and --resume.
                saving = cfg.save_every is not None and (step % cfg.save_every == 0 or step == total_steps)
                if saving or stop:
                    state.update(examples_seen=step * per_step, num_tokens=tokens_seen)
                    saved = self._checkpoint(step, wrapped, model, tokenizer, optimizer, scheduler, state)
                if stop:
                    bar.close()
                    log.close()
                    raise StopRequested(
                        f"stopped by {signals.name or 'a signal on another process'} after step {step}; saved "
                        f"{saved}; run the same command with --resume to continue",
                        128 + (signals.received or 15),
                    )
        bar.close()

        final_dir = self._finish(step, start_step, total_steps, wrapped, model, tokenizer, task, log, card)
        return TrainResult(self.output_dir, step, log.history, final_dir)

    # ------------------------------------------------------------------ pieces of the loop

    def _finish(
        self,
        step: int,
        start_step: int,
        total_steps: int,
        wrapped: nn.Module,
        model: nn.Module,
        tokenizer: Any,
        task: Task,
        log: MetricsLog,
        card: dict[str, Any] | None,
    ) -> Path | None:
        """The closing evaluation and ``final/`` (with its model card) once the last step is done."""
        cfg, final_dir = self.cfg, None
        if start_step >= total_steps:  # resumed a finished run: nothing to redo
            self.say(f"the run already reached step {total_steps}; raise train.max_steps to continue it")
            final_dir = self.output_dir / "final"
        elif step == total_steps:
            if task.eval_examples and not (cfg.eval_every and step % cfg.eval_every == 0):
                log.log(step, self.evaluate(wrapped, task))
            weights = sharding.full_weights(self.accelerator, wrapped)  # every process gathers
            if self.is_main:
                check_finite_weights(model, str(self.output_dir / "final"), weights)
                text = model_card(self.output_dir, self.config, log.history, card or {})
                final_dir = save_final(self.output_dir, model, tokenizer, text, weights)
                self.say(f"saved {final_dir}")
        log.close()
        # Every rank leaves together (the main one was saving). The group stays up (a script may
        # train again); the command line ends it at its exit (distributed.close_process_group).
        self.accelerator.wait_for_everyone()
        return final_dir

    def _accumulate(
        self, wrapped: nn.Module, task: Task, order: list[int], trainable: list[nn.Parameter]
    ) -> tuple[MetricSums, list[str], Tensor]:
        """This process's micro-batches of one step, forward and backward; returns their metric
        sums, the records they held, and the gradient norm before clipping."""
        cfg, accelerator = self.cfg, self.accelerator
        step_sums, records = MetricSums(self.device), []
        # Exact normalization: every micro-batch divides by the whole step's weight (DDP averages
        # the processes' gradients, hence the share of one process).
        if task.weight is None:
            normalizer = float(cfg.batch_size * cfg.grad_accum)
        else:
            normalizer = sum(task.weight(task.examples[i]) for i in order) / accelerator.num_processes
        for micro in range(cfg.grad_accum):
            offset = (micro * accelerator.num_processes + accelerator.process_index) * cfg.batch_size
            examples = [task.examples[i] for i in order[offset : offset + cfg.batch_size]]
            records += [str(getattr(e, "where", "")) for e in examples]
            batch = task.collate(examples).to(self.device)
            last_micro = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(wrapped):
                with accelerator.autocast():
                    losses, metrics = task.loss(wrapped, batch)
                sharding.backward(accelerator, wrapped, losses.sum() / normalizer, last_micro)
            weight = None if task.weight is None else sum(task.weight(e) for e in examples)
            step_sums.add({"loss": losses, **metrics}, batch.num_examples, batch.num_tokens, weight)
        # An infinite limit only measures the norm.
        grad_norm = sharding.clip_gradients(accelerator, wrapped, trainable, cfg.max_grad_norm or math.inf)
        return step_sums, records, grad_norm

    def optimizer_for(self, trainable: list[nn.Parameter], total_steps: int) -> tuple[Any, Any]:
        """AdamW over the trainable parameters, and the learning-rate schedule with its warmup."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            trainable,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
        )
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
        schedule = "constant_with_warmup" if cfg.scheduler == "constant" and warmup else cfg.scheduler
        scheduler = get_scheduler(
            schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
        )
        return optimizer, scheduler

    @property
    def _bar(self) -> bool:
        return self.cfg.progress and self.is_main

    def _resume(
        self, wrapped: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any], unit: str
    ) -> tuple[int, float]:
        """Optimizer, schedule and RNG of the checkpoint resumed (weights came before); (step, tokens)."""
        if self.resume_from is None:
            return 0, 0.0
        load_optimizer = sharding.optimizer_loader(self.accelerator, wrapped, optimizer)
        saved = load_checkpoint(self.resume_from, None, optimizer, scheduler, load_optimizer)
        if saved.get("examples_per_step", state["examples_per_step"]) != state["examples_per_step"]:
            raise ConfigError(
                f"train.batch_size/grad_accum: {self.resume_from} was trained with {saved['examples_per_step']} "
                f"{unit} per step, this run uses {state['examples_per_step']}; resume with the same batch geometry"
            )
        if saved.get("start_digest", state["start_digest"]) != state["start_digest"]:
            raise CheckpointError(
                f"{self.resume_from}: this run starts from other weights than the run being resumed (a changed "
                "hub revision, or a model object that was already trained); its reference would differ"
            )
        self.say(f"resumed from {self.resume_from} at step {saved['step']}")
        return saved["step"], float(saved.get("num_tokens", 0.0))

    def _checkpoint(
        self,
        step: int,
        wrapped: nn.Module,
        model: nn.Module,
        tokenizer: Any,
        optimizer: Any,
        scheduler: Any,
        state: dict[str, Any],
    ) -> Path:
        path = self.output_dir / f"checkpoint-{step:07d}"
        weights = sharding.full_weights(self.accelerator, wrapped)  # sharded: every process gathers
        moments = sharding.optimizer_state(self.accelerator, wrapped, optimizer, path)
        if self.is_main:
            check_finite_weights(model, str(path), weights)
            save_checkpoint(
                self.output_dir,
                step,
                model,
                tokenizer,
                optimizer,
                scheduler,
                state,
                self.cfg.save_total_limit,
                weights,
                moments,
            )
        self.accelerator.wait_for_everyone()
        return path

    def _last_checkpoint_note(self) -> str:
        found = list_checkpoints(self.output_dir)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def evaluate(self, module: nn.Module, task: Task) -> dict[str, float]:
        """Every metric averaged over the eval examples (sharded across processes), prefixed ``eval_``.

        Runs the unwrapped module: a DDP forward talks to the other ranks, and shards may hold
        different numbers of batches; only the final sum is collective. Under FSDP2 every forward
        is: a process whose shard ran out repeats a batch and drops its numbers.
        """
        accelerator, size = self.accelerator, self.cfg.batch_size
        unwrapped = accelerator.unwrap_model(module)
        was_training = unwrapped.training
        unwrapped.eval()
        shard = list(task.eval_examples)[accelerator.process_index :: accelerator.num_processes]
        rounds = sharding.eval_batches(accelerator, len(task.eval_examples), len(shard), size)
        sums = MetricSums(self.device)
        with torch.no_grad():
            for start in range(0, rounds * size, size):
                examples = shard[start : start + size] or list(task.eval_examples[:1])
                batch = task.collate(examples).to(self.device)
                with accelerator.autocast():
                    losses, metrics = task.loss(unwrapped, batch)
                if start >= len(shard):  # a repeated batch, run only to keep the processes together
                    continue
                weight = None if task.weight is None else sum(task.weight(e) for e in examples)
                sums.add({"loss": losses, **metrics}, batch.num_examples, batch.num_tokens, weight)
        unwrapped.train(was_training)
        means, _, _ = sums.read(accelerator, sync_names=True)
        return {f"eval_{name}": value for name, value in task.summarize(means).items()}
