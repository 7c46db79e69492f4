"""A reward from its name: a reward-model folder, an ensemble folder or a ``module:function``.

Here, above both :mod:`.scoring` (one model, a function) and :mod:`.ensemble` (several models
scored as one), so that neither needs the other to know what a name means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ScorerError
from .ensemble import EnsembleScorer, is_ensemble
from .scoring import DEFAULT_TIMEOUT, FunctionScorer, RewardModelScorer, Scorer


def load_scorer(
    spec: str,
    allow_unscored: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
    aggregate: str = "mean",
    uncertainty_penalty: float = 1.0,
    **model_options: Any,
) -> Scorer:
    """A reward-model folder (``model_options`` go to :class:`RewardModelScorer`), an ensemble
    folder (``rm train --ensemble K``: its members' rewards made into one by ``aggregate``), or a
    function named ``module:function`` / ``file.py:function`` (called on ``batch_size`` completions
    at a time, each call given ``timeout`` seconds; several columns: aggregated alike)."""
    if is_ensemble(spec):
        return EnsembleScorer(spec, aggregate, uncertainty_penalty, **model_options)
    if Path(spec).is_dir():
        return RewardModelScorer(spec, **model_options)
    if ":" in spec:
        batch_size = model_options.get("batch_size", 64)
        return FunctionScorer(spec, batch_size, allow_unscored, timeout, aggregate, uncertainty_penalty)
    raise ScorerError(f"{spec}: not a reward-model folder, nor a function named module:function")
