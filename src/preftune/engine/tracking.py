"""Metrics from the loop to where they go: device-side sums read once per logging step, then
``metrics.jsonl`` (always), accelerate's experiment trackers and the console.

``metrics.jsonl`` holds one strict-JSON object per logged step. Trackers are accelerate's
own classes (TensorBoard, W&B, MLflow, trackio), started on the main process only; each
keeps its offline mode (``WANDB_MODE=offline``, MLflow's local file store under the
output folder, trackio's local database), so none needs a network.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from ..data.files import json_safe
from ..errors import ConfigError


class MetricSums:
    """Device-side running sums, read with one collective per logging step (no per-step sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.per_batch: set[str] = set()
        self.examples = torch.zeros((), device=device)
        self.weight = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)
        self.batches = 0

    def add(
        self, metrics: dict[str, Tensor], examples: int, tokens: Tensor | float, weight: float | None = None
    ) -> None:
        """Per-example metrics ``[B]`` are averaged over ``weight`` (default: the examples; SFT
        gives its loss tokens, so its loss is a token mean), 0-dim ones over micro-batches."""
        for name, value in metrics.items():
            value = value.detach().float()
            if value.dim() == 0:
                self.per_batch.add(name)
            total = self.sums.get(name)
            self.sums[name] = value.sum() if total is None else total + value.sum()
        self.examples += examples
        self.weight += examples if weight is None else weight
        self.tokens += tokens
        self.batches += 1

    def absorb(self, other: MetricSums) -> None:
        """Add another window's sums (a step's, once it is known to be finite)."""
        for name, total in other.sums.items():
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.per_batch |= other.per_batch
        self.examples += other.examples
        self.weight += other.weight
        self.tokens += other.tokens
        self.batches += other.batches

    def read(
        self, accelerator: Accelerator, sync_names: bool = False
    ) -> tuple[dict[str, float], float, float]:
        """(means, examples, tokens) summed over processes; then starts a new window.

        ``sync_names``: a process may have seen no batch (an evaluation shard can be empty), so
        agree on the metric names first; the collective needs the same tensors everywhere.
        """
        names = list(self.sums)  # the order metrics were first reported in, the same on every process
        if sync_names and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            names = sorted(set(gather_object(names)))
            for name in names:
                self.sums.setdefault(name, torch.zeros((), device=self.device))
        batches = torch.tensor(float(self.batches), device=self.device)
        extra = [self.examples, self.weight, self.tokens, batches]
        stacked = torch.stack([*(self.sums[n] for n in names), *extra])
        totals = accelerator.reduce(stacked, reduction="sum").tolist()
        examples, weight, tokens, batches_total = totals[-4:]
        means = {
            name: total / max(batches_total if name in self.per_batch else weight, 1e-12)
            for name, total in zip(names, totals, strict=False)
        }
        self.__init__(self.device)  # type: ignore[misc]
        return means, examples, tokens


def check_trackers(names: Sequence[str]) -> list[str]:
    """The trackers to start (``none`` dropped); refuses one that is not installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from accelerate.utils import imports

    chosen = [name for name in names if name != "none"]
    for name in chosen:
        available = getattr(imports, f"is_{name}_available", lambda: False)()
        if not available or name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.report_to: '{name}' is not installed (pip install {name})")
    return chosen


def logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Appends logged steps to ``metrics.jsonl`` and every tracker; keeps them in ``history``."""

    def __init__(
        self,
        output_dir: Path,
        trackers: Sequence[str],
        config: dict[str, Any],
        start_step: int,
        resumed: bool,
        is_main: bool,
        console: Callable[[int, dict[str, float]], None] | None = None,
    ):
        self.history: list[dict[str, float]] = []
        """The steps logged by this process (a resumed run: those after its checkpoint)."""
        self.earlier: list[dict[str, Any]] = []
        """The steps of ``metrics.jsonl`` logged before the checkpoint a run resumed from."""
        self.console = console
        self.file = None
        self.trackers: list[Any] = []
        if not is_main:
            return
        path = output_dir / "metrics.jsonl"
        # Keep what was logged up to the resumed step; a fresh run starts a fresh file.
        kept = path.read_text().splitlines() if resumed and path.exists() else []
        kept = [line for line in kept if logged_step(line) <= start_step]
        self.earlier = [json.loads(line) for line in kept]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")
        for name in trackers:
            self.trackers.append(_start_tracker(name, output_dir, start_step, config))

    @property
    def log_history(self) -> list[dict[str, Any]]:
        """Every logged step of the run so far, resumed or not (the main process's)."""
        return [*self.earlier, *self.history]

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **values}
        self.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(json_safe(record)) + "\n")
            self.file.flush()
        for tracker in self.trackers:
            tracker.log(values, step=step)
        if self.console is not None:
            self.console(step, values)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _start_tracker(name: str, output_dir: Path, start_step: int, config: dict[str, Any]) -> Any:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    run_name = output_dir.name or "preftune"
    kwargs: dict[str, Any] = {}
    if name == "tensorboard":
        # purge_step drops events a crashed run logged after its last checkpoint.
        kwargs = {
            "logging_dir": str(output_dir / "tensorboard"),
            "purge_step": start_step + 1 if start_step else None,
        }
        run_name = ""
    elif name == "mlflow":
        kwargs = {"experiment_name": "preftune"}
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store: no server needed
            import mlflow

            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
    tracker = LOGGER_TYPE_TO_CLASS[name](run_name=run_name, **kwargs)
    tracker.start()
    tracker.store_init_configuration(_flat(config))
    return tracker


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 1}}`` -> ``{"train.seed": 1}``, lists as text: what trackers accept."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                value if isinstance(value, bool | int | float | str | None) else str(value)
            )
    return out


COMMON_CONSOLE = ("learning_rate", "grad_norm", "epoch")
"""Shown after every recipe's own metrics, as TRL's log lines show them."""


def console_values(shown: Sequence[str], values: dict[str, float], prefix: str = "") -> dict[str, str]:
    """What the console shows of a logged step, under the logged names (TRL's): the recipe's metrics
    ``shown`` (``loss``, ``rewards/accuracies``, ``rewards/margins``, …), then the learning rate,
    the gradient norm and the epoch; ``prefix`` (``eval_``) picks an evaluation's."""
    names = [*shown, *(name for name in COMMON_CONSOLE if name not in shown)]
    return {prefix + name: f"{values[prefix + name]:.4g}" for name in names if prefix + name in values}


def console_line(
    say: Callable[..., None], shown: Sequence[str], unit: str, total_steps: int
) -> Callable[[int, dict[str, float]], None]:
    """One line per logged step where no terminal shows a progress bar (a log file, CI)."""

    def line(step: int, values: dict[str, float]) -> None:
        prefix = "eval_" if any(name.startswith("eval_") for name in values) else ""
        parts = [f"{name} {text}" for name, text in console_values(shown, values, prefix).items()]
        rate = f"{unit}_per_second"
        if rate in values:
            parts.append(f"{unit}/s {values[rate]:.1f}")
        say(f"step {step}/{total_steps} " + " ".join(parts))

    return line


def setting_text(value: Any) -> str:
    """A config value as YAML's flow style and ``--set`` write it: ``[dpo, ipo]``, ``true``, ``null``."""
    if isinstance(value, list):
        return "[" + ", ".join(setting_text(v) for v in value) + "]"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def config_lines(config: Any) -> str:
    """The run's settings the user chose, as every key whose value is not its default (a key set
    to its default value is not told apart from one left alone), one ``section.key: value`` a
    line, as ``--set`` and the YAML sections spell them."""
    from ..config import RunConfig, to_dict

    defaults = to_dict(RunConfig())
    lines = [
        f"  {section}.{key}: {setting_text(value)}"
        for section, values in to_dict(config).items()
        for key, value in values.items()
        if defaults[section][key] != value
    ]
    return "\n".join(["config (every key not at its default; `preftune config` lists them all):", *lines])


class Window:
    """The steps since the last log, read once at the logged step.

    A step adds device-side sums (:attr:`sums`: per-example metrics, read with one collective, no
    per-step host sync), or values it already holds on the host (:meth:`add_step`: PPO reads its
    updates' metrics once a step), which are averaged over the steps; and the gradient norms it
    logs (:attr:`grad_norms`).
    """

    def __init__(self, device: torch.device):
        self.sums = MetricSums(device)
        self.per_step: dict[str, list[float]] = {}
        self.grad_norms: list[Tensor] = []
        self.started = time.perf_counter()

    def add_step(self, values: dict[str, float], examples: int, tokens: int) -> None:
        """One step's values (each averaged over the steps of the window), and what it trained on."""
        for name, value in values.items():
            self.per_step.setdefault(name, []).append(value)
        self.sums.add({}, examples, float(tokens))

    def read(
        self, accelerator: Accelerator, summarize: Callable[[dict[str, float]], dict[str, float]], unit: str
    ) -> tuple[dict[str, float], float]:
        """The logged values (one host sync) and the tokens of the window; a new window starts.

        A window whose every step was skipped (non-finite) holds no metrics; every process
        skipped the same steps, so all agree to log only the bookkeeping."""
        elapsed = time.perf_counter() - self.started
        values: dict[str, float] = {}
        tokens = 0.0
        if self.sums.batches:
            means, examples, tokens = self.sums.read(accelerator)
            values = summarize(means | {name: sum(v) / len(v) for name, v in self.per_step.items()})
            if self.grad_norms:
                values["grad_norm"] = torch.stack(self.grad_norms).mean().item()
            values[f"{unit}_per_second"] = examples / elapsed
            values["tokens_per_second"] = tokens / elapsed
        self.__init__(self.sums.device)  # type: ignore[misc]
        return values, tokens


@dataclass
class Progress:
    """Where the loop reports: the window of steps since the last log, the log, the progress bar,
    and the tokens trained on so far."""

    window: Window
    log: MetricsLog
    bar: Any
    tokens_seen: float = 0.0

    def close(self) -> None:
        self.bar.close()
        self.log.close()
