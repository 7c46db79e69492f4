"""The contract between a recipe and the harness: what a recipe hands over, what comes back,
and the order in which examples are visited.

A recipe hands :meth:`Harness.fit` its :class:`Models` and a :class:`StepSource`: the work of one
step. The harness runs the loop around it (progress, metrics, evaluation, signals, checkpoints,
``final/``). The DPO family, KTO, SFT and reward models describe their loss as a :class:`Task`
and use the standard source, :class:`~.steps.ExampleSteps`; PPO brings its own
(:class:`~preftune.recipes.ppo.PPOSteps`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import DataError

if TYPE_CHECKING:
    from .tracking import Window
    from .update import Updater

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, Tensor]]]


@dataclass
class Task:
    """What one kind of training computes; a recipe builds it and hands it to :meth:`Harness.fit`."""

    examples: Sequence[Any]
    """Training examples; the data stream indexes them."""
    collate: Callable[[list[Any]], Any]
    """Examples -> a batch on the host (with ``.to(device)``, ``.num_examples``, ``.num_tokens``)."""
    loss: LossFn
    """``(module, batch) -> (losses [B], metrics)``: per-example losses; metrics ``[B]`` are
    averaged over examples, 0-dim ones over micro-batches."""
    eval_examples: Sequence[Any] = ()
    summarize: Callable[[dict[str, float]], dict[str, float]] = lambda values: values
    """Turns averaged metrics into logged ones (e.g. a ratio of two sums)."""
    console: tuple[str, ...] = ("loss",)
    """The metrics shown on the progress bar and plain log lines, by their logged (TRL's) names; the
    learning rate, gradient norm and epoch follow them."""
    unit: str = "pairs"
    """What an example is: throughput is logged as ``<unit>_per_second``."""
    weight: Callable[[Any], float] | None = None
    """An example's share of the step's loss (SFT: its loss tokens, so the loss is a token mean
    over the whole step, as TRL normalizes it); None: every example counts alike."""


@dataclass
class Models:
    """What a run trains and saves."""

    module: nn.Module
    """Trained: the optimizer holds its trainable parameters (the policy inside the module whose
    forward gives its log-probs; PPO: the policy and the critic together)."""
    model: nn.Module
    """The transformers model inside ``module``, saved at the top of every checkpoint and in ``final/``."""
    tokenizer: Any
    extra_models: dict[str, nn.Module] = field(default_factory=dict)
    """Saved in a subfolder of their name in every checkpoint (PPO's critic in ``value/``)."""
    start_digest: str = ""
    """A digest of the starting weights: a resumed run must start from the same ones."""
    card: dict[str, Any] = field(default_factory=dict)
    """The recipe's lines of the model card (``kind``, ``objective``, …)."""


@dataclass
class StepPlan:
    """How a step source's run is counted and shown."""

    total_steps: int
    updates_per_step: int = 1
    """Optimizer updates per step: the schedule runs over every update."""
    steps_setting: str = "train.max_steps"
    """The setting that extends a finished run."""
    unit: str = "pairs"
    """What an example is: throughput is logged as ``<unit>_per_second``."""
    console: tuple[str, ...] = ("loss",)
    """The metrics shown on the progress bar and plain log lines (logged names; the learning rate,
    gradient norm and epoch follow them)."""
    skipped_metric: str = "skipped_steps"
    """The logged count of updates skipped as non-finite (``train.nonfinite=skip``)."""


class StepSource(Protocol):
    """The work of one step, which :meth:`Harness.fit` asks for at every step of its loop."""

    plan: StepPlan

    def state(self) -> dict[str, Any]:
        """Saved in every checkpoint's ``preftune_state.json``: the geometry a resumed run must keep,
        and the source's own state (PPO's β)."""
        ...

    def start(self, step: int, checkpoint: Path | None, saved: dict[str, Any]) -> None:
        """Begin after ``step`` (0: a fresh run); resuming, ``saved`` is ``checkpoint``'s trainer
        state: refuse another geometry, restore the source's state."""
        ...

    def step(self, step: int, module: nn.Module, update: Updater, window: Window) -> None:
        """Step ``step``: forward and backward passes of ``module`` (as prepared), each optimizer
        update through ``update``, the step's metrics into ``window``."""
        ...

    def summarize(self, means: dict[str, float]) -> dict[str, float]:
        """A window's averaged metrics -> the logged ones (e.g. a ratio of two sums)."""
        ...

    def current(self, step: int) -> dict[str, float]:
        """Values logged as they are at ``step`` (the epoch; PPO's episode and β)."""
        ...

    def evaluate(self, module: nn.Module) -> dict[str, float]:
        """Metrics on held-out examples, prefixed ``eval_`` (empty: nothing to evaluate)."""
        ...


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None
    data_report: Any = None


def data_stream(num_examples: int, seed: int, shuffle: bool) -> Iterator[int]:
    """Endless example indices: epoch after epoch, each a fresh seeded permutation.

    Stateless given the seed, so resuming at step k means skipping k · examples-per-step items.
    No examples is refused here, at once: an endless stream over nothing would never yield.
    """
    if num_examples < 1:
        raise DataError("no examples to train on: every record was dropped or the source is empty")
    return _epochs(num_examples, seed, shuffle)


def _epochs(num_examples: int, seed: int, shuffle: bool) -> Iterator[int]:
    epoch = 0
    while True:
        if shuffle:
            generator = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(num_examples, generator=generator).tolist()
        else:
            order = list(range(num_examples))
        yield from order
        epoch += 1
