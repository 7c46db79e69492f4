"""The objective section: every parameter an objective can take, declared once, and its ranges.

Part of the ground floor beside :mod:`preftune.config` (which puts it into
:class:`~preftune.config.RunConfig`); it imports nothing of preftune but its errors. Which
objectives read which parameters is the registry's business (:mod:`preftune.losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .coerce import need


@dataclass(frozen=True)
class ObjectiveConfig:
    """The objective and every parameter an objective can take, declared here once.

    Objectives receive this object (with ``beta`` resolved) and declare in the registry
    which of these fields they read.
    """

    loss: list[str] = field(default_factory=lambda: ["sigmoid"])
    """One objective or several (weighted sum), by registered name: ``sigmoid``/``dpo``, ``ipo``, ``dpop``, ..."""
    weights: list[float] | None = None
    """One weight per name in ``loss``; default 1 each."""
    beta: float | None = None
    """None: the objective's own default (0.1 for the DPO family, 2.0 for SimPO)."""
    label_smoothing: float = 0.0
    """ε: the share of labels assumed flipped (cDPO, robust, EXO, AOT, SimPO, CPO)."""
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """f-DPO's divergence from the reference (Wang et al. 2023): ``reverse_kl`` is DPO's; the others
    apply to the objectives that read the log-ratios only through chosen − rejected."""
    f_divergence_alpha: float = 0.5
    """α of ``alpha_divergence``, as TRL's ``f_alpha_divergence_coef``: α → 1 is reverse KL, α = 0 forward KL."""
    dpop_lambda: float = 50.0
    """DPOP's λ: weight of the penalty on the chosen likelihood falling below the reference's."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature τ of the modulation σ(x/τ)."""
    cpo_alpha: float = 1.0
    """Weight of the NLL term on the chosen completion in ``cpo``, ``cpo_hinge``, ``cpo_ipo`` and the
    ``cpo_simpo`` preset (the SimPO repository's ``sft_weight``)."""
    alphapo_alpha: float = 0.0
    """AlphaPO's α: reference-free rewards from the likelihood p as ``(1 − p^−α)/α`` instead of
    ``log p`` (α = 0); TRL's CPO ``alpha``."""
    rpo_alpha: float = 1.0
    """Weight of the NLL term in the ``rpo`` preset (DPO + α·NLL)."""
    ld_alpha: float | None = None
    """LD-DPO's α (Liu et al. 2024): tokens past the shorter completion's length count α times in the
    policy's and the reference's log-probs of the log-ratio objectives; None: off (α = 1)."""
    wpo: bool = False
    """WPO (Zhou et al. 2024): weight each pair's loss by the policy's own, detached, probability of
    its two completions; TRL's ``use_weighting``."""
    desirable_weight: float = 1.0
    """KTO's λ_D, the weight of the desirable examples' losses; with unequal counts the KTO paper
    (Eq. 8) asks for λ_D·n_D / (λ_U·n_U) in [1, 4/3]."""
    undesirable_weight: float = 1.0
    """KTO's λ_U, the weight of the undesirable examples' losses."""


def check_objective(o: ObjectiveConfig) -> None:
    """Ranges of the objective parameters (the registry checks which objectives use them)."""
    need(o.beta is None or o.beta > 0, "objective.beta", f"must be > 0, got {o.beta}")
    eps = o.label_smoothing
    need(0 <= eps < 0.5, "objective.label_smoothing", f"must be in [0, 0.5), got {eps}")
    need(o.dpop_lambda >= 0, "objective.dpop_lambda", f"must be >= 0, got {o.dpop_lambda}")
    need(o.discopop_tau > 0, "objective.discopop_tau", f"must be > 0, got {o.discopop_tau}")
    need(o.cpo_alpha >= 0, "objective.cpo_alpha", f"must be >= 0, got {o.cpo_alpha}")
    need(o.rpo_alpha >= 0, "objective.rpo_alpha", f"must be >= 0, got {o.rpo_alpha}")
    for key in ("f_divergence_alpha", "alphapo_alpha"):
        need(math.isfinite(getattr(o, key)), f"objective.{key}", f"must be finite, got {getattr(o, key)}")
    for key in ("desirable_weight", "undesirable_weight"):
        value = getattr(o, key)
        need(math.isfinite(value) and value >= 0, f"objective.{key}", f"must be finite and >= 0, got {value}")
    need(
        o.desirable_weight > 0 or o.undesirable_weight > 0,
        "objective.desirable_weight",
        "and objective.undesirable_weight are both 0: every example would weigh nothing and the loss stay 0",
    )
    if o.f_divergence_alpha != ObjectiveConfig.f_divergence_alpha:
        need(
            o.f_divergence == "alpha_divergence",
            "objective.f_divergence_alpha",
            f"only read with objective.f_divergence=alpha_divergence, not {o.f_divergence}",
        )
    need(
        o.ld_alpha is None or 0 <= o.ld_alpha <= 1,
        "objective.ld_alpha",
        f"must be in [0, 1] (or null), got {o.ld_alpha}",
    )
    if o.weights is not None:
        need(
            len(o.weights) == len(o.loss),
            "objective.weights",
            f"{len(o.weights)} weights for {len(o.loss)} objectives",
        )
        need(
            all(w >= 0 and w != float("inf") for w in o.weights),
            "objective.weights",
            f"must be finite and >= 0, got {o.weights}",
        )
