"""One optimizer update, the same code for every recipe:

    norm         <- the gradient's global norm, clipped to train.max_grad_norm (null: only measured)
    finite, stop <- one collective: finite on every process? a signal on any?
    finite:         optimizer step
    not finite:     stop the run naming the step and its records, or (train.nonfinite=skip) skip
                    the update, at most train.max_skipped_steps times
    schedule step; gradients zeroed

A step source (:mod:`.task`) calls it after each update's backward passes: once a step for the
DPO family, KTO, SFT and reward models, ``ppo_epochs × num_mini_batches`` times a step for PPO.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import Tensor, nn

from ..config import TrainConfig
from . import sharding
from .checkpoint import list_checkpoints
from .guard import NonFiniteError, Signals, nonfinite_message, step_verdict


@dataclass
class Optimization:
    """The module as ``accelerate`` prepared it, its trainable parameters, optimizer and schedule."""

    wrapped: nn.Module
    trainable: list[nn.Parameter]
    optimizer: Any
    scheduler: Any


class Updater:
    """Applies the updates of a run and keeps what the loop reads of them: the updates skipped, whether
    a stop was asked (on any process), and the learning rate of the last update."""

    def __init__(
        self,
        accelerator: Accelerator,
        optimization: Optimization,
        cfg: TrainConfig,
        signals: Signals,
        output_dir: Path,
        say: Callable[..., None],
    ):
        self.accelerator, self.optimization, self.cfg = accelerator, optimization, cfg
        self.signals, self.output_dir, self.say = signals, output_dir, say
        self.skipped = 0
        self.stop = False
        self.learning_rate = math.nan

    def __call__(self, step: int, loss: Tensor, records: Sequence[str]) -> tuple[bool, Tensor]:
        """Apply the update whose gradients the backward passes left; ``loss``: its summed loss (a
        non-finite loss can leave finite gradients), ``records``: where its examples came from.
        Returns (finite, the gradient norm before clipping)."""
        cfg, opt = self.cfg, self.optimization
        # An infinite limit only measures the norm.
        norm = sharding.clip_gradients(
            self.accelerator, opt.wrapped, opt.trainable, cfg.max_grad_norm or math.inf
        )
        finite, stop = step_verdict(self.accelerator, norm, loss, bool(self.signals.received))
        self.stop = self.stop or stop
        self.learning_rate = opt.scheduler.get_last_lr()[0]
        if finite:
            opt.optimizer.step()
        else:
            self._skip(step, loss, norm, records)
        with warnings.catch_warnings():  # a skipped update has no optimizer.step() before it
            warnings.simplefilter("ignore", UserWarning)
            opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        return finite, norm

    def _skip(self, step: int, loss: Tensor, norm: Tensor, records: Sequence[str]) -> None:
        self.skipped += 1
        if self.cfg.nonfinite == "stop" or self.skipped >= self.cfg.max_skipped_steps:
            found = list_checkpoints(self.output_dir)
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            raise NonFiniteError(nonfinite_message(step, loss.item(), norm.item(), records, kept))
        self.say(f"step {step}: a non-finite loss or gradient, update skipped ({self.skipped} so far)")
