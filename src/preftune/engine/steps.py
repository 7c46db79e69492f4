"""The standard step source: a :class:`~.task.Task`'s examples, step by step.

    step k: examples [k·G, (k+1)·G) of a seeded stream, G = batch_size · grad_accum · processes
        for each micro-batch of this process:
            losses, metrics = task.loss(module, batch)               per-example, [B]
            backward(sum(losses) / examples per optimizer step)     exact accumulation
        one optimizer update (clip, verdict, step, schedule: :mod:`.update`)

The stream is stateless given the seed, so resuming at step k needs only k.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError
from . import sharding
from .task import StepPlan, Task, data_stream
from .tracking import MetricSums, Window
from .update import Updater


class ExampleSteps:
    """One optimizer step a step, on the examples of ``task`` (the DPO family, KTO, SFT, reward models)."""

    def __init__(self, task: Task, accelerator: Accelerator, cfg: TrainConfig):
        self.task, self.accelerator, self.cfg = task, accelerator, cfg
        self.per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(task.examples) / self.per_step))
        self.plan = StepPlan(total, unit=task.unit, console=task.console)
        self.stream = data_stream(len(task.examples), cfg.seed, cfg.shuffle)
        self.examples_seen = 0

    def state(self) -> dict[str, Any]:
        return {"examples_per_step": self.per_step, "examples_seen": self.examples_seen}

    def start(self, step: int, checkpoint: Path | None, saved: dict[str, Any]) -> None:
        if saved.get("examples_per_step", self.per_step) != self.per_step:
            raise ConfigError(
                f"train.batch_size/grad_accum: {checkpoint} was trained with {saved['examples_per_step']} "
                f"{self.task.unit} per step, this run uses {self.per_step}; resume with the same batch geometry"
            )
        for _ in range(step * self.per_step):
            next(self.stream)
        self.examples_seen = step * self.per_step

    def step(self, step: int, module: nn.Module, update: Updater, window: Window) -> None:
        order = [next(self.stream) for _ in range(self.per_step)]
        self.examples_seen += self.per_step
        step_sums, records = self._accumulate(module, order)
        finite, grad_norm = update(step, step_sums.sums["loss"], records)
        if finite:  # a skipped step's metrics are left out of the logs
            window.sums.absorb(step_sums)
            if self.cfg.max_grad_norm is not None:
                window.grad_norms.append(grad_norm)

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        return self.task.summarize(means)

    def current(self, step: int) -> dict[str, float]:
        return {"epoch": step * self.per_step / len(self.task.examples)}

    def _accumulate(self, module: nn.Module, order: list[int]) -> tuple[MetricSums, list[str]]:
        """This process's micro-batches of one step, forward and backward; returns their metric
        sums and the records they held."""
        cfg, accelerator, task = self.cfg, self.accelerator, self.task
        step_sums, records = MetricSums(accelerator.device), []
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
            batch = task.collate(examples).to(accelerator.device)
            last_micro = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(module):
                with accelerator.autocast():
                    losses, metrics = task.loss(module, batch)
                sharding.backward(accelerator, module, losses.sum() / normalizer, last_micro)
            weight = None if task.weight is None else sum(task.weight(e) for e in examples)
            step_sums.add({"loss": losses, **metrics}, batch.num_examples, batch.num_tokens, weight)
        return step_sums, records

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Every metric averaged over the eval examples (sharded across processes), prefixed ``eval_``.

        Runs the unwrapped module: a DDP forward talks to the other ranks, and shards may hold
        different numbers of batches; only the final sum is collective. Under FSDP2 every forward
        is: a process whose shard ran out repeats a batch and drops its numbers.
        """
        accelerator, task, size = self.accelerator, self.task, self.cfg.batch_size
        if not task.eval_examples:
            return {}
        unwrapped = accelerator.unwrap_model(module)
        was_training = unwrapped.training
        unwrapped.eval()
        shard = list(task.eval_examples)[accelerator.process_index :: accelerator.num_processes]
        rounds = sharding.eval_batches(accelerator, len(task.eval_examples), len(shard), size)
        sums = MetricSums(accelerator.device)
        with torch.no_grad():
            for start in range(0, rounds * size, size):
                examples = shard[start : start + size] or list(task.eval_examples[:1])
                batch = task.collate(examples).to(accelerator.device)
                with accelerator.autocast():
                    losses, metrics = task.loss(unwrapped, batch)
                if start >= len(shard):  # a repeated batch, run only to keep the processes together
                    continue
                weight = None if task.weight is None else sum(task.weight(e) for e in examples)
                sums.add({"loss": losses, **metrics}, batch.num_examples, batch.num_tokens, weight)
        unwrapped.train(was_training)
        means, _, _ = sums.read(accelerator, sync_names=True)
        return {f"eval_{name}": value for name, value in task.summarize(means).items()}
