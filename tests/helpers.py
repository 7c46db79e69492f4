"""Small builders shared by the training tests."""

from __future__ import annotations

import math
import random

import torch

from preftune.config import ObjectiveConfig, RunConfig, load_config
from preftune.losses import Objective, PairStats, build_objective
from preftune.synthetic import SentimentTask

# What TRL's DPOTrainer logs every step, and what preftune must log under the same names.
TRL_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "learning_rate",
)
THROUGHPUT_METRICS = ("pairs_per_second", "tokens_per_second")


def sentiment_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` standard records from the synthetic task, chosen by the true reward (ties skipped)."""
    task, rng = SentimentTask(), random.Random(seed)
    records: list[dict[str, str]] = []
    while len(records) < n:
        prompt = task.prompt(rng.choice(["park", "movie", "book", "song"]))
        a, b = task.random_response(rng), task.random_response(rng)
        if task.true_reward(a) == task.true_reward(b):
            continue
        chosen, rejected = (a, b) if task.true_reward(a) > task.true_reward(b) else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def unpaired_records(n: int, seed: int = 0) -> list[dict[str, object]]:
    """``n`` unpaired (KTO) records from the synthetic task, labels alternating, desirable first."""
    records: list[dict[str, object]] = []
    for i, pair in enumerate(sentiment_records(n, seed=seed)):
        desirable = i % 2 == 0
        completion = pair["chosen"] if desirable else pair["rejected"]
        records.append({"prompt": pair["prompt"], "completion": completion, "label": desirable})
    return records


def quiet_config(output_dir: str, *overrides: str) -> RunConfig:
    """A fast CPU config: no progress bar, no trackers, no checkpoints unless asked, log every step, fp32."""
    return load_config(
        overrides=[
            f"train.output_dir={output_dir}",
            "train.progress=false",
            "train.report_to=none",
            "train.log_every=1",
            "train.learning_rate=1e-3",
            "train.mixed_precision=no",
            "train.save_every=null",
            *overrides,
        ]
    )


# --------------------------------------------------------------------------- objectives

DTYPE = torch.float64


def neg_logsigmoid(x: float) -> float:
    """``−log σ(x) = log(1 + e^{−x})``."""
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def stats_of(
    pi_w: list[float],
    pi_l: list[float],
    rho_w: list[float] | None = None,
    rho_l: list[float] | None = None,
    n_w: list[int] | None = None,
    n_l: list[int] | None = None,
    requires_grad: bool = False,
) -> PairStats:
    """PairStats from plain lists; the policy log-probs are leaf tensors when ``requires_grad``."""
    n = len(pi_w)

    def t(values: list[float] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=DTYPE)

    return PairStats(
        chosen_logps=torch.tensor(pi_w, dtype=DTYPE, requires_grad=requires_grad),
        rejected_logps=torch.tensor(pi_l, dtype=DTYPE, requires_grad=requires_grad),
        chosen_tokens=torch.tensor(n_w or [1] * n),
        rejected_tokens=torch.tensor(n_l or [1] * n),
        ref_chosen_logps=t(rho_w),
        ref_rejected_logps=t(rho_l),
    )


def objective(*loss: str, **kw: object) -> Objective:
    """The objective(s) named, built from an ``ObjectiveConfig`` with the values given."""
    return build_objective(ObjectiveConfig(loss=list(loss), **kw))  # type: ignore[arg-type]
