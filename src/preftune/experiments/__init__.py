"""Miniature reproductions of what the field learned about DPO: ``preftune experiment NAME``.

Each experiment runs end to end on the synthetic sentiment task (tiny local models, a known
true reward, Bradley–Terry-labelled pairs whose best possible accuracy is known) in a few
minutes on two CPU cores, and writes ``results.json`` (every number), ``report.md`` and a PNG.
The registry maps a name to its description and its ``run(output, seed, quick)``; a module is
imported only when its experiment runs, so ``--list`` stays quick.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from ..config.coerce import suggest
from ..errors import ConfigError

RunFn = Callable[[Path, int, bool], dict[str, Any]]

# name -> (description, module holding `run`)
_EXPERIMENTS = {
    "dporm-vs-exrm": (
        "DPO's implicit reward vs a reward model trained on the same pairs: accuracy in distribution, "
        "under prompt shift and under response shift, against the Bayes ceiling (Lin et al. 2024)",
        "dporm_vs_exrm",
    ),
    "frontier": (
        "true reward against KL(π‖π_ref): DPO at several β, PPO at several KL coefficients (true reward and a "
        "learned reward model), online DPO, and best-of-N as the analytic reference (Rafailov et al. 2023, Fig. 2)",
        "frontier",
    ),
    "likelihood-drift": (
        "pairs whose rejected is the chosen with k = 1…16 tokens substituted: how DPO and DPOP move "
        "log p(chosen) as k grows (Pal et al. 2024)",
        "likelihood_drift",
    ),
    "online-vs-offline": (
        "offline DPO on a fixed preference set vs online DPO on the policy's own samples labelled by a "
        "reward model, same pairs and steps: true reward, win rate and KL spent (Xiong et al. 2024)",
        "online_vs_offline",
    ),
    "overoptimization": (
        "best-of-n, online DPO and PPO against one learned proxy reward and against an ensemble's mean, min and "
        "mean − std: the true reward and the proxy against √KL (Gao et al. 2022; Coste et al. 2023)",
        "overoptimization",
    ),
    "ranking-consistency": (
        "after DPO and after SimPO: the share of training and held-out pairs whose chosen has the higher "
        "mean log-prob, and the true reward reached (Meng et al. 2024)",
        "ranking_consistency",
    ),
}


def _runner(module: str) -> RunFn:
    def run(output: Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
        return import_module(f".{module}", __name__).run(output, seed, quick)

    return run


EXPERIMENTS: dict[str, tuple[str, RunFn]] = {
    name: (description, _runner(module)) for name, (description, module) in _EXPERIMENTS.items()
}


def get(name: str) -> tuple[str, RunFn]:
    """The experiment called ``name``, or a ConfigError naming the ones there are."""
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment '{name}'{suggest(name, EXPERIMENTS)}; "
            f"there are: {', '.join(EXPERIMENTS)} (preftune experiment --list)"
        )
    return EXPERIMENTS[name]
