"""What every experiment shares: the synthetic world, quiet training runs, and the write-up.

The world is :mod:`preftune.experiments.synthetic`'s: a local BPE tokenizer (every task word is one
token), tiny Llamas, and the sentiment task whose true reward is known, so that accuracies
are measured against Bradley–Terry labels with a known best possible score.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig, load_config
from ..data.files import json_safe, write_jsonl, write_text
from ..engine import TrainResult
from .synthetic import NEGATIVE, POSITIVE, SentimentTask, build_tokenizer, tiny_llama

VOCAB_SIZE = 512
MAX_LENGTH = 96


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread, without transformers' save/load progress bars. The models are
    so small that a second thread gains little, and on a machine whose cores are busy, threads
    waiting for each other made a training run up to 7 times slower (2.4 s on one, 16 s on two)."""
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class Lab:
    """One experiment's folder, seed and clock; training runs go to ``runs/``, their logs beside them."""

    output: Path
    seed: int
    quick: bool
    started: float = field(default_factory=time.perf_counter)
    tokenizer: Any = None

    def __post_init__(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        if self.tokenizer is None:
            self.tokenizer = build_tokenizer(vocab_size=VOCAB_SIZE)

    def say(self, message: str) -> None:
        print(f"[{self.seconds():5.0f} s] {message}", flush=True)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def config(self, run: str, settings: dict[str, Any]) -> RunConfig:
        """A quiet CPU run in ``runs/<run>``: no progress bar or tracker, fp32, one log line at
        the end; a rerun of the experiment starts the run over. Quick runs use batches of 8."""
        base = {
            "train.output_dir": str(self.output / "runs" / run),
            "train.progress": False,
            "train.report_to": ["none"],
            "train.log_every": 10_000,
            "train.mixed_precision": "no",
            "train.overwrite": True,
            "train.save_total_limit": 1,
            "train.seed": self.seed,
            "train.batch_size": 32,
            "data.max_length": MAX_LENGTH,
            **settings,
        }
        if self.quick:  # a few full batches even from a few dozen pairs
            base["train.batch_size"] = 8
            base["train.warmup_steps"] = min(int(base.get("train.warmup_steps", 0)), 1)
        return load_config(base=base)

    def train(
        self,
        run: str,
        fit: Callable[..., TrainResult],
        model: nn.Module,
        records: Sequence[dict[str, Any]],
        settings: dict[str, Any],
        eval_records: Sequence[dict[str, Any]] | None = None,
    ) -> TrainResult:
        """``fit`` (a recipe's train function) on ``records``; its console output goes to ``runs/<run>.log``."""
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            result = fit(
                self.config(run, settings),
                model=model,
                tokenizer=self.tokenizer,
                train_data=list(records),
                eval_data=None if eval_records is None else list(eval_records),
            )
        (self.output / "runs" / f"{run}.log").write_text(log.getvalue(), encoding="utf-8")
        return result

    def sft(self, task: SentimentTask, steps: int, run: str = "sft", seed_offset: int = 0) -> nn.Module:
        """A tiny Llama taught to write the task's reviews: the reference (or another policy)."""
        from ..recipes.dpo import train

        rng = random.Random(self.seed + seed_offset)
        records = [
            {"prompt": prompt, "chosen": task.random_response(rng), "rejected": task.random_response(rng)}
            for prompt in task.prompts(max(steps * 32, 64), self.seed + seed_offset)
        ]
        model = tiny_llama(len(self.tokenizer), seed=self.seed + seed_offset)
        settings = {
            "objective.loss": ["sft"],
            "train.learning_rate": 3e-3,
            "train.max_steps": steps,
            "train.warmup_steps": min(10, steps // 4),
            "data.identical_pairs": "drop",
        }
        self.train(run, train, model, records, settings)
        return model.eval()

    def policy(
        self,
        run: str,
        reference: nn.Module,
        records: Sequence[dict[str, Any]],
        settings: dict[str, Any],
        eval_records: Sequence[dict[str, Any]] | None = None,
    ) -> tuple[nn.Module, TrainResult]:
        """A copy of ``reference`` trained with the DPO family (``settings``: objective and schedule)."""
        from ..recipes.dpo import train

        model = copy.deepcopy(reference)
        result = self.train(run, train, model, records, settings, eval_records)
        return model.eval(), result

    def write(self, name: str, results: dict[str, Any], report: str) -> list[Path]:
        """``results.json`` (every number) and ``report.md``, each written whole or not at all."""
        results = {"experiment": name, "seed": self.seed, "quick": self.quick, **results}
        results["seconds"] = round(self.seconds(), 1)
        results_path = write_text(
            self.output / "results.json", json.dumps(json_safe(results, digits=6), indent=2)
        )
        return [results_path, write_text(self.output / "report.md", report.rstrip() + "\n")]

    def save_records(self, name: str, records: Sequence[dict[str, Any]]) -> Path:
        """A generated preference set as JSONL under ``data/``, for ``preftune eval`` to read again."""
        return write_jsonl(self.output / "data" / f"{name}.jsonl", records)


def bradley_terry(
    task: SentimentTask, prompt: str, a: str, b: str, rng: random.Random, scale: float = 8.0
) -> tuple[dict[str, str], float]:
    """One pair labelled as :meth:`SentimentTask.bradley_terry_pairs` labels its own:
    ``P(a ≻ b) = σ(scale · (r(a) − r(b)))``; also returns the Bayes-optimal accuracy ``max(p, 1 − p)``."""
    p = 1 / (1 + math.exp(-scale * (task.true_reward(a) - task.true_reward(b))))
    chosen, rejected = (a, b) if rng.random() < p else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, max(p, 1 - p)


def substituted_pair(task: SentimentTask, k: int, rng: random.Random) -> dict[str, str]:
    """A random review in which k words are positive in chosen and negative in rejected: the two
    differ in exactly k tokens (every task word is one token) and chosen is truly better."""
    words = task.random_response(rng).split()
    chosen, rejected = list(words), list(words)
    for position in rng.sample(range(len(words)), k):
        chosen[position], rejected[position] = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    return {
        "prompt": task.prompt(rng.choice(["park", "movie", "book", "song", "meal", "trip"])),
        "chosen": " " + " ".join(chosen),
        "rejected": " " + " ".join(rejected),
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table aligned for a terminal."""
    cells = [list(map(str, header)), *[list(map(str, row)) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    )


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"
