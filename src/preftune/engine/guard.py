"""What stops a run safely: a signal asking it to stop, and numbers that are no longer finite.

Both are decided once per optimizer step, by every process together (one tiny collective and
one host sync per step), so all ranks stop at the same step boundary:

* SIGTERM (a pre-empted node, ``kill``) and SIGINT (Ctrl-C) let the step finish, write a
  checkpoint and end with a message saying how to resume; a second Ctrl-C stops at once.
* A non-finite loss or gradient norm stops the run before the optimizer applies it, naming
  the step and the records of the batch (``train.nonfinite=skip`` skips such steps instead,
  up to ``train.max_skipped_steps``). Weights are checked again before anything is saved.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PreftuneError


class StopRequested(PreftuneError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(PreftuneError):
    """The loss, a gradient or the weights stopped being finite."""


class Signals:
    """SIGTERM and SIGINT handlers for the span of the training loop (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without waiting for the step
        self.received = number

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


class StopAtOnce:
    """SIGTERM and SIGINT where no step can finish first (online DPO's sampling and scoring): the run
    stops at once, saying what it was doing (``doing``). What it completed is on disk already, each
    file whole or not at all, and ``--resume`` reuses it. Inside, the training loop's
    :class:`Signals` take over (and give these handlers back when the loop ends)."""

    def __init__(self, doing: str = "the run") -> None:
        self.doing = doing
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopAtOnce:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        raise StopRequested(
            f"stopped by {signal.Signals(number).name} during {self.doing}; run the same command with "
            "--resume to continue (complete rounds and saved samples are reused)",
            128 + number,
        )


def step_verdict(accelerator: Any, grad_norm: Tensor, loss_sum: Tensor, stop: bool) -> tuple[bool, bool]:
    """(finite, stop) as every process sees it: finite only if finite everywhere, stop if any
    process was asked to stop."""
    finite = torch.isfinite(grad_norm).all() & torch.isfinite(loss_sum).all()
    flags = torch.stack([finite.float(), torch.tensor(float(stop), device=finite.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    finite_count, stop_count = flags.tolist()
    return finite_count == accelerator.num_processes, stop_count > 0


def check_finite_weights(model: nn.Module, what: str, weights: dict[str, Tensor] | None = None) -> None:
    """Refuse to save weights that are not finite (they would replace good ones); ``weights``:
    the gathered ones of a sharded model, checked in place of the model's."""
    if weights is not None:
        named = [(name, t) for name, t in weights.items() if t.is_floating_point()]
    else:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    bad = [name for name, tensor in named if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"{what}: not saved, {len(bad)} weight tensors are not finite (first: {bad[0]})")


def nonfinite_message(step: int, loss: float, grad_norm: float, records: Iterable[str], kept: str) -> str:
    return (
        f"step {step}: the loss ({loss:g}) or gradient norm ({grad_norm:g}) is not finite, in {batch_of(records)}; "
        f"the weights were not updated and {kept}. Lower train.learning_rate or set train.max_grad_norm "
        "and --resume, or --set train.nonfinite=skip"
    )


def batch_of(records: Iterable[str], shown: int = 4) -> str:
    """``a batch of records d.jsonl:3, d.jsonl:9 and 6 more``: each record named once (a record may
    give several examples), the first ``shown`` of them; examples without a name (passed in Python)
    are counted instead."""
    names = list(records)
    named = list(dict.fromkeys(name for name in names if name))
    unnamed = len(names) - sum(1 for name in names if name)
    if not named:
        return f"a batch of {unnamed} unnamed records"
    more = [f"{len(named) - shown} more"] if len(named) > shown else []
    more += [f"{unnamed} unnamed"] if unnamed else []
    return f"a batch of records {', '.join(named[:shown])}" + "".join(f" and {m}" for m in more)


def tell_launcher(err: BaseException) -> None:
    """Under ``torchrun`` / ``accelerate launch``, a failing process's error goes into the
    launcher's closing summary (its root cause), not only into the interleaved logs; the
    launcher ends the other processes as soon as one exits."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(err)
