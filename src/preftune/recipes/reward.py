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

from typing import Any

from torch import nn

from ..config import RunConfig
from ..data.outputs import releases_locks
from ..engine import Harness, TrainResult
from ..model.load import load_reward_model
from .common import load_pairs, tokenizer_for
from .reward_fit import bradley_terry_loss, fit_reward_model

__all__ = ["bradley_terry_loss", "fit_reward_model", "train_reward_model"]


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
