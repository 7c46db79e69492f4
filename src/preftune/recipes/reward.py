"""Bradley–Terry reward models: ``r(x, y)`` such that ``P(y_w ≻ y_l) = σ(r(x, y_w) − r(x, y_l))``.

    loss = −log σ(r_w − r_l − m)  [+ c · (r_w + r_l)²]

``m`` is an optional per-pair margin column (Llama 2's margin loss, Touvron et al. 2023);
the centering term (Eisenstein et al. 2023, arXiv 2312.09244; TRL's
``center_rewards_coefficient``) keeps rewards near zero so several models stay comparable.
The same pairs, layouts and harness as the DPO recipe (``data.layout``: a packed or prefix-shared
row computes the prompt once and reads chosen's and rejected's scores at their own last tokens);
the model is an ``AutoModelForSequenceClassification`` with one output, its score read at the
last token.
Metrics carry TRL's ``RewardTrainer`` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data import TokenizedPair
from ..data.layouts import Batch
from ..data.outputs import releases_locks
from ..data.packing import collate_for
from ..engine import ExampleSteps, Harness, LossFn, Models, Task, TrainResult
from ..model.load import load_reward_model, prepare_for_training
from ..model.reference import weights_digest
from ..model.reward_head import RewardModule
from .common import layout_for, load_pairs, tokenizer_for


def bradley_terry_loss(center_coefficient: float | None) -> LossFn:
    """A micro-batch's per-pair losses, and TRL's metrics: ``accuracy`` and ``margin`` per pair;
    ``min_reward``, ``mean_reward``, ``max_reward`` over the micro-batch's 2B rewards."""

    def loss(reward_model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = reward_model(batch)
        chosen, rejected = rewards[batch.chosen], rewards[batch.rejected]
        losses = -F.logsigmoid(chosen - rejected - batch.margins)
        if center_coefficient:
            losses = losses + center_coefficient * (chosen + rejected) ** 2
        return losses, {
            "accuracy": (chosen > rejected).float(),
            "margin": (chosen - rejected).detach(),
            "min_reward": rewards.detach().min(),
            "mean_reward": rewards.detach().mean(),
            "max_reward": rewards.detach().max(),
        }

    return loss


@releases_locks
def train_reward_model(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a reward model on ``config.data`` (or the records given); ``final/`` loads with
    ``AutoModelForSequenceClassification`` and scores with ``preftune rm score``. With
    ``rm.ensemble`` K > 1, an ensemble of K (:mod:`.reward_ensemble`), scored as one."""
    if config.rm.ensemble > 1:
        from .reward_ensemble import train_reward_ensemble

        return train_reward_ensemble(
            config, model=model, tokenizer=tokenizer, train_data=train_data, eval_data=eval_data,
            stop_after=stop_after,
        )  # fmt: skip
    # check
    harness = Harness(config, "rm")

    # data: every record checked before any model loads
    tokenizer = tokenizer_for(config, tokenizer)
    pairs, eval_pairs, report = load_pairs(harness, tokenizer, train_data, eval_data, config.rm.margin_field)
    harness.decide_start()

    # load
    if model is None:
        model = load_reward_model(config.model, tokenizer.pad_token_id, harness.say)

    # loop, then final/: the harness
    result, _ = fit_reward_model(harness, model, tokenizer, pairs, eval_pairs, stop_after)
    result.data_report = report
    return result


def fit_reward_model(
    harness: Harness,
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    stop_after: int | None = None,
    loss: LossFn | None = None,
    card: dict[str, Any] | None = None,
) -> tuple[TrainResult, nn.Module]:
    """The harness's loop on ``pairs`` for ``model`` (LoRA applied as the config says); returns
    the result and the model as trained (a LoRA model keeps its adapters). ``loss``: the
    Bradley–Terry loss by default; ``card``: lines of the model card beyond the objective's."""
    config = harness.config
    model = prepare_for_training(model, config.model, task_type="SEQ_CLS")
    centering = config.rm.center_rewards_coefficient
    harness.say(f"reward model: Bradley–Terry{f', centering c={centering}' if centering else ''}")
    layout = layout_for(harness, model)
    task = Task(
        examples=pairs,
        collate=collate_for(layout, tokenizer.pad_token_id, config.data.pack_tokens),
        loss=loss or bradley_terry_loss(centering),
        eval_examples=eval_pairs,
        console=("loss", "accuracy", "margin"),
    )
    lines = {"kind": "reward-model", "objective": "Bradley–Terry", "centering": centering} | (card or {})
    models = Models(RewardModule(model), model, tokenizer, start_digest=weights_digest(model), card=lines)
    steps = ExampleSteps(task, harness.accelerator, config.train)
    return harness.fit(models, steps, stop_after), model
