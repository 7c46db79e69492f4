"""The objective registry: every preference objective as a small pure function.

* :mod:`.registry` — :class:`PairStats` (what objectives read), :class:`LossOutput`, ``register``
* :mod:`.dpo_family` — DPO and the objectives on log-ratios against the reference
* :mod:`.reference_free` — SimPO, CPO, ORPO
* :mod:`.unpaired` — KTO and APO-zero on unpaired examples, with their own small registry
* :mod:`.build` — :func:`build_objective`: a config -> a validated weighted sum of objectives
"""

from . import dpo_family, reference_free  # noqa: F401  (registers the objectives)
from .build import (
    OPTIONS,
    PRESETS,
    Objective,
    available,
    build_objective,
    build_unpaired_objective,
    is_unpaired,
)
from .registry import ALIASES, REGISTRY, LossOutput, ObjectiveSpec, PairStats, Params, register
from .unpaired import (
    UNPAIRED,
    UnpairedObjective,
    UnpairedOutput,
    UnpairedSpec,
    UnpairedStats,
    kto_reference_point,
)

__all__ = [
    "ALIASES",
    "OPTIONS",
    "PRESETS",
    "REGISTRY",
    "UNPAIRED",
    "LossOutput",
    "Objective",
    "ObjectiveSpec",
    "PairStats",
    "Params",
    "UnpairedObjective",
    "UnpairedOutput",
    "UnpairedSpec",
    "UnpairedStats",
    "available",
    "build_objective",
    "build_unpaired_objective",
    "is_unpaired",
    "kto_reference_point",
    "register",
]
