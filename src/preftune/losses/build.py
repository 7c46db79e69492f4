"""Building an objective from its config: names, aliases, presets, weights, the rules that
depend on which objectives are chosen."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from torch import Tensor

from ..config import ObjectiveConfig, check_objective
from ..errors import ConfigError
from .registry import ALIASES, REGISTRY, LossOutput, ObjectiveSpec, PairStats, Params
from .unpaired import UNPAIRED, UnpairedObjective

# Named mixtures: (term, weight-parameter) pairs. RPO = DPO + α·NLL on chosen (Pang et al. 2024);
# CPO-SimPO = SimPO + α·NLL (TRL's CPO trainer with loss_type="simpo"; the SimPO repo's sft_weight).
PRESETS: dict[str, list[tuple[str, str | None]]] = {
    "rpo": [("sigmoid", None), ("sft", "rpo_alpha")],
    "cpo_simpo": [("simpo", None), ("sft", "cpo_alpha")],
}

# Options that change the objectives they apply to, rather than being one objective's parameter.
OPTIONS = {
    "ld_alpha": "LD-DPO (Liu et al. 2024, arXiv 2409.06411): tokens past the shorter completion's length "
    "count α times, for policy and reference; every objective with a reference",
    "wpo": "WPO (Zhou et al. 2024, arXiv 2406.11827): each pair's loss weighted by the policy's own "
    "probability of both completions; every objective that does not couple the batch",
    "f_divergence": "f-DPO (Wang et al. 2023, arXiv 2309.16240): forward_kl, js_divergence, "
    "alpha_divergence (f_divergence_alpha) instead of DPO's reverse_kl; the objectives listing it",
}

# Fields that are not one objective's parameter: which objectives, their weights, β, and the
# modifiers of the whole objective (LD-DPO, WPO), which have rules of their own.
_SELECTION = ("loss", "weights", "beta", "ld_alpha", "wpo")


@dataclass(frozen=True)
class Objective:
    """A validated weighted sum of registered objectives with resolved parameters."""

    terms: tuple[tuple[ObjectiveSpec, float], ...]
    params: Params

    @property
    def needs_reference(self) -> bool:
        return any(spec.needs_reference for spec, _ in self.terms)

    @property
    def couples_batch(self) -> bool:
        return any(spec.couples_batch for spec, _ in self.terms)

    @property
    def name(self) -> str:
        return "+".join(spec.name for spec, _ in self.terms)

    @property
    def needs_tails(self) -> bool:
        """LD-DPO is on: the statistics must carry the sums over each completion's tail."""
        return self.params.ld_alpha is not None

    @property
    def needs_wpo(self) -> bool:
        """WPO is on: the statistics must carry the policy's WPO sums."""
        return self.params.wpo

    def __call__(self, stats: PairStats) -> LossOutput:
        """Weighted sum of the terms' per-pair losses; rewards come from the first term.

        With LD-DPO the objectives on log-ratios read the desensitized statistics, the NLL and
        reference-free terms the plain ones (as TRL); with WPO each pair's sum is weighted.
        """
        alpha = self.params.ld_alpha
        desensitized = stats if alpha is None else stats.desensitized(alpha)
        first: LossOutput | None = None
        total: Tensor | None = None
        for spec, weight in self.terms:
            out = spec.fn(desensitized if spec.needs_reference else stats, self.params)
            first = first or out
            total = out.losses * weight if total is None else total + out.losses * weight
        assert first is not None and total is not None
        if self.params.wpo:
            total = total * stats.wpo_weights()
        return LossOutput(total, first.chosen_rewards, first.rejected_rewards)


def available() -> list[str]:
    return sorted([*REGISTRY, *ALIASES, *PRESETS, *UNPAIRED])


def _resolve(name: str) -> str:
    name = name.strip().lower()
    if name in REGISTRY or name in PRESETS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name in UNPAIRED:
        raise ConfigError(
            f"objective.loss: '{name}' learns from unpaired examples and is trained alone; "
            "it cannot be mixed with pairwise objectives"
        )
    close = difflib.get_close_matches(name, available(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"objective.loss: unknown objective '{name}'{hint}; available: {', '.join(available())}"
    )


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """Resolve names, presets and weights, and check the rules that depend on the objectives.

    Ranges of the parameters themselves are declared and checked with the config
    (:func:`preftune.config.check_objective`).
    """
    check_objective(cfg)
    names = [_resolve(n) for n in cfg.loss]
    if not names:
        raise ConfigError("objective.loss: name at least one objective")
    weights = cfg.weights if cfg.weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"objective.weights: {len(weights)} weights for {len(names)} objectives")
    terms: list[tuple[ObjectiveSpec, float]] = []
    for name, weight in zip(names, weights, strict=True):
        for term, weight_param in PRESETS.get(name, [(name, None)]):
            factor = getattr(cfg, weight_param) if weight_param else 1.0
            terms.append((REGISTRY[term], weight * factor))
    # The default β belongs to the main objective, not to an NLL term mixed in.
    main = next((spec for spec, _ in terms if spec.name != "sft"), terms[0][0])
    _check_parameters(cfg, names, [spec for spec, _ in terms])
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ObjectiveConfig)}
    values["beta"] = cfg.beta if cfg.beta is not None else main.default_beta
    return Objective(tuple(terms), Params(**values))


def is_unpaired(cfg: ObjectiveConfig) -> bool:
    """The objective learns from unpaired examples (KTO): the unpaired recipe trains it."""
    return any(name.strip().lower() in UNPAIRED for name in cfg.loss)


def build_unpaired_objective(cfg: ObjectiveConfig) -> UnpairedObjective:
    """Resolve an unpaired objective (``kto``, ``apo_zero_unpaired``) and check its parameters:
    it is trained alone, and the options of the pairwise objectives do not apply to it."""
    check_objective(cfg)
    names = [n.strip().lower() for n in cfg.loss]
    if len(names) != 1 or names[0] not in UNPAIRED:
        raise ConfigError(
            f"objective.loss: {', '.join(names)}: an unpaired objective ({', '.join(sorted(UNPAIRED))}) "
            "is trained alone, not in a mixture"
        )
    spec = UNPAIRED[names[0]]
    # The options of _SELECTION that only a sum of pairwise objectives reads.
    for key in ("weights", "ld_alpha", "wpo"):
        value = getattr(cfg, key)
        if value not in (None, False):
            raise ConfigError(f"objective.{key}: {value} applies to pairwise objectives, not {spec.name}")
    _refuse_unread(cfg, names, set(spec.uses))
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ObjectiveConfig)}
    values["beta"] = cfg.beta if cfg.beta is not None else spec.default_beta
    return UnpairedObjective(spec, Params(**values))


def _users(field: str) -> list[str]:
    """The objectives and presets that read ``field``."""
    users = [name for name, spec in REGISTRY.items() if field in spec.uses]
    users += [name for name, spec in UNPAIRED.items() if field in spec.uses]
    return sorted(users + [name for name, terms in PRESETS.items() if any(w == field for _, w in terms)])


def _check_parameters(cfg: ObjectiveConfig, names: list[str], specs: list[ObjectiveSpec]) -> None:
    """A parameter set away from its default must be read by one of the chosen objectives
    (a silently ignored knob is a wasted run), and the rules between objectives and parameters."""
    unsupported = [s.name for s in specs if s.needs_reference and "f_divergence" not in s.uses]
    if cfg.f_divergence != "reverse_kl" and unsupported:
        raise ConfigError(
            f"objective.f_divergence: {cfg.f_divergence} applies only to {', '.join(_users('f_divergence'))} "
            f"(their losses read the log-ratios only through chosen − rejected, where f-DPO's "
            f"β log Z(x) cancels); not to {', '.join(unsupported)}"
        )
    used = {field for spec in specs for field in spec.uses}
    used |= {w for name in names for _, w in PRESETS.get(name, []) if w}
    _refuse_unread(cfg, names, used)
    if cfg.ld_alpha is not None and not any(s.needs_reference for s in specs):
        raise ConfigError(
            f"objective.ld_alpha: LD-DPO desensitizes log-ratios against the reference; "
            f"'{'+'.join(names)}' reads none"
        )
    coupled = [s.name for s in specs if s.couples_batch]
    if cfg.wpo and coupled:
        raise ConfigError(
            f"objective.wpo: WPO weights each pair's loss, and {', '.join(coupled)} sorts across the "
            "batch, which would misalign the weights"
        )
    if any(s.name == "exo_pair" for s in specs) and cfg.label_smoothing <= 0:
        raise ConfigError("objective.label_smoothing: exo_pair needs ε > 0 (e.g. 1e-3)")
    given = [n.strip().lower() for n in cfg.loss]
    if "alphapo" in given and cfg.alphapo_alpha == 0:
        raise ConfigError("objective.alphapo_alpha: alphapo needs α ≠ 0 (with α = 0 it is simpo)")


def _refuse_unread(cfg: ObjectiveConfig, names: list[str], used: set[str]) -> None:
    """A parameter set away from its default must be read by one of the chosen objectives."""
    for f in dataclasses.fields(ObjectiveConfig):
        value = getattr(cfg, f.name)
        if f.name in _SELECTION or f.name in used or value == f.default:
            continue
        raise ConfigError(
            f"objective.{f.name}: {value} is ignored by '{'+'.join(names)}'; "
            f"only {', '.join(_users(f.name))} use it"
        )
