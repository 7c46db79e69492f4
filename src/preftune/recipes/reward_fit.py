"""The Bradley–Terry loss and the loop that fits one reward model on pairs, shared by a single
reward model (:mod:`.reward`) and each member of an ensemble (:mod:`.reward_ensemble`).

    loss = −log σ(r_w − r_l − m)  [+ c · (r_w + r_l)²]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..data import TokenizedPair
from ..data.layouts import Batch
from ..data.packing import collate_for
from ..engine import ExampleSteps, Harness, LossFn, Models, Task, TrainResult
from ..model.load import prepare_for_training
from ..model.reference import weights_digest
from ..model.reward_head import RewardModule
from .common import layout_for


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
