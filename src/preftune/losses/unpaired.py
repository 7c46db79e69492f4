"""Unpaired objectives (KTO): each example is one completion, labelled desirable or not.

They read per-example statistics (:class:`UnpairedStats`) rather than pairs: the summed
completion log-probs ``π`` under the policy and ``ρ`` under the reference, the labels, and, for
KTO, the batch's estimate ``z`` of KL(π‖π_ref). Notation: ``r = π − ρ`` an example's log-ratio,
``λ_D, λ_U`` the desirable and undesirable weights, ``σ`` the logistic function.

**The KL estimate is per micro-batch**, as TRL computes it (:func:`kto_reference_point`): each prompt is
scored with the completion of another example of the same micro-batch, the mean of
``π − ρ`` over those mismatched sequences is averaged over the processes and clamped at 0, with
no gradient. An example's loss therefore depends on the other examples of its micro-batch,
through a detached constant: with gradient accumulation every micro-batch has its own ``z``
(4 micro-batches of 2 are not one batch of 8), and under data parallelism ``z`` covers every
process's micro-batch. Accumulation is allowed, as in TRL; the recipe says which scope applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ObjectiveConfig
from .registry import Params


@dataclass
class UnpairedStats:
    """Per-example statistics of a batch of B examples; tensors ``[B]`` except ``kl``."""

    logps: Tensor
    """Summed completion log-probs under the policy."""
    ref_logps: Tensor
    """The same under the reference."""
    desirable: Tensor
    """True for desirable examples, False for undesirable ones."""
    kl: Tensor
    """0-dim, detached: the batch's KL estimate ``z`` (0 for objectives that need none)."""

    @property
    def logratios(self) -> Tensor:
        """``r = π − ρ``."""
        return self.logps - self.ref_logps


@dataclass
class UnpairedOutput:
    """Per-example ``losses`` (weights applied) and detached ``rewards`` ``β r``, both ``[B]``."""

    losses: Tensor
    rewards: Tensor


UnpairedFn = Callable[[UnpairedStats, Params], UnpairedOutput]


@dataclass(frozen=True)
class UnpairedSpec:
    name: str
    fn: UnpairedFn
    default_beta: float
    uses: tuple[str, ...]
    """The :class:`ObjectiveConfig` fields it reads besides β."""
    needs_kl: bool
    """It reads the micro-batch's KL estimate (so the batch carries the mismatched sequences)."""


UNPAIRED: dict[str, UnpairedSpec] = {}


def register_unpaired(
    name: str, *, default_beta: float = 0.1, uses: tuple[str, ...] = (), needs_kl: bool = False
) -> Callable[[UnpairedFn], UnpairedFn]:
    fields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    assert set(uses) <= fields, f"{name}: unknown parameters {set(uses) - fields}"

    def add(fn: UnpairedFn) -> UnpairedFn:
        UNPAIRED[name] = UnpairedSpec(name, fn, default_beta, uses, needs_kl)
        return fn

    return add


def kto_reference_point(
    policy_kl_logps: Tensor, reference_kl_logps: Tensor, gather_mean: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """KTO's reference point ``z`` as TRL computes it: the micro-batch mean of ``π − ρ`` over the
    mismatched (prompt, other completion) sequences, averaged over the processes by
    ``gather_mean`` (None: one process), clamped at 0 (KL is non-negative; the estimate from a few
    sequences need not be), and detached (the paper treats ``z`` as a constant)."""
    local = (policy_kl_logps - reference_kl_logps).mean().detach()
    return (local if gather_mean is None else gather_mean(local)).clamp(min=0)


def weighted(losses_desirable: Tensor, losses_undesirable: Tensor, s: UnpairedStats, p: Params) -> Tensor:
    """Each example's loss: ``λ_D·`` the desirable form where it is desirable, ``λ_U·`` the other."""
    return torch.where(
        s.desirable, p.desirable_weight * losses_desirable, p.undesirable_weight * losses_undesirable
    )


@register_unpaired("kto", uses=("desirable_weight", "undesirable_weight"), needs_kl=True)
def kto(s: UnpairedStats, p: Params) -> UnpairedOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eqs. 7–8), the prospect-theoretic value of
    each completion against the reference point ``z`` (the batch's KL estimate):
    ``λ_D (1 − σ(β(r − z)))`` for a desirable example, ``λ_U (1 − σ(β(z − r)))`` for an undesirable one.
    """
    r, z = s.logratios, s.kl
    losses = weighted(1 - torch.sigmoid(p.beta * (r - z)), 1 - torch.sigmoid(p.beta * (z - r)), s, p)
    return UnpairedOutput(losses, p.beta * r.detach())


@register_unpaired("apo_zero_unpaired", uses=("desirable_weight", "undesirable_weight"))
def apo_zero_unpaired(s: UnpairedStats, p: Params) -> UnpairedOutput:
    """APO-zero, unpaired (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7 split by label; TRL's
    KTO ``apo_zero_unpaired``): raise desirable, lower undesirable likelihoods against the reference,
    no KL term: ``λ_D (1 − σ(β r))`` for a desirable example, ``λ_U σ(β r)`` for an undesirable one."""
    r = s.logratios
    losses = weighted(1 - torch.sigmoid(p.beta * r), torch.sigmoid(p.beta * r), s, p)
    return UnpairedOutput(losses, p.beta * r.detach())


@dataclass(frozen=True)
class UnpairedObjective:
    """A validated unpaired objective with resolved parameters (it is trained alone)."""

    spec: UnpairedSpec
    params: Params

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_kl(self) -> bool:
        return self.spec.needs_kl

    def __call__(self, stats: UnpairedStats) -> UnpairedOutput:
        return self.spec.fn(stats, self.params)
