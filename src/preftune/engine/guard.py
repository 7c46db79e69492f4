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

RESUME = "run the same command with --resume to continue"


class StopRequested(PreftuneError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal.
    ``problem`` is what happened, ``remedy`` what to do: a caller that ran the command another
    way (a pipeline's stage) says what to do in its own terms."""

    def __init__(self, problem: str, exit_code: int, remedy: str = ""):
        super().__init__(f"{problem}; {remedy}" if remedy else problem)
        self.problem, self.exit_code, self.remedy = problem, exit_code, remedy


NONFINITE_REMEDY = (
    "Lower train.learning_rate or set train.max_grad_norm and --resume, or --set train.nonfinite=skip"
)


class NonFiniteError(PreftuneError):
    """The loss, a gradient or the weights stopped being finite (``problem``, and ``remedy``
    when there is one, as for :class:`StopRequested`)."""

    def __init__(self, problem: str, remedy: str = ""):
        super().__init__(f"{problem}. {remedy}" if remedy else problem)
        self.problem, self.remedy = problem, remedy


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


MAGNITUDE_JUMP = 1e3
"""How far a trained tensor's largest |value| may grow over its value at the start (or over 1, for a
tensor that starts below 1, as LoRA's zero-initialised B does) before its weights count as diverged.
Fine-tuning moves weights by a small fraction of their size; a thousandfold growth is a blown-up step."""


def weight_scale(model: nn.Module) -> dict[str, float]:
    """The largest |value| of each trained tensor, taken at the start of a run: the yardstick
    :func:`check_finite_weights` measures the saved weights against."""
    with torch.no_grad():
        return {
            name: float(p.detach().abs().max()) if p.numel() else 0.0
            for name, p in model.named_parameters()
            if p.requires_grad
        }


def check_finite_weights(
    model: nn.Module,
    what: str,
    weights: dict[str, Tensor] | None = None,
    start_scale: dict[str, float] | None = None,
) -> None:
    """Refuse to save weights that are not finite, or that grew more than :data:`MAGNITUDE_JUMP`
    times over ``start_scale`` (one step at ``lr=1e20`` leaves finite weights of size 1e20): they would
    replace good ones. ``weights``: the gathered ones of a sharded model, checked in place of the model's."""
    if weights is not None:
        named = [(name, t) for name, t in weights.items() if t.is_floating_point()]
    else:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    bad = [name for name, tensor in named if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"{what}: not saved, {len(bad)} weight tensors are not finite (first: {bad[0]})")
    for name, tensor in named:
        start = (start_scale or {}).get(name)
        if start is None or not tensor.numel():
            continue
        largest = float(tensor.detach().abs().max())
        if largest > MAGNITUDE_JUMP * max(start, 1.0):
            raise NonFiniteError(
                f"{what}: not saved, weight tensor {name} grew from max |w| {start:.3g} at the start to "
                f"{largest:.3g} (over {MAGNITUDE_JUMP:g}x): the training diverged",
                "Lower train.learning_rate or set train.max_grad_norm",
            )


def nonfinite_message(step: int, loss: float, grad_norm: float, records: Iterable[str], kept: str) -> str:
    return (
        f"step {step}: the loss ({loss:g}) or gradient norm ({grad_norm:g}) is not finite, in {batch_of(records)}; "
        f"the weights were not updated and {kept}"
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
