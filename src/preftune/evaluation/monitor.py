"""A gold-vs-proxy monitor: is the policy overoptimizing the reward it is trained on?

Gao et al. 2022 (arXiv 2210.10760): optimizing a learned reward (the *proxy*), the reward that
was meant (the *gold*) rises, peaks and falls as the policy moves away from its start, while the
proxy keeps rising. A run cannot see the gold reward, but it can score the same samples with a
second reward it is not trained on — a held-out reward model, another ensemble, a function — and
watch the two part ways.

Each round (online DPO) or logged step (PPO) gives a point: the mean reward optimized, the mean
monitor reward, and the KL to the starting policy. When the reward rose and the monitor fell at
each of the last ``patience`` points, the monitor says so (a warning), and with ``stop`` it asks
the run to end, keeping the policy of the point with the highest monitor reward.

A mean over a few dozen samples moves by chance: where a point carries the standard error of its
monitor mean, the monitor's fall over those points must also exceed ``noise_z`` standard errors
of the difference (``reward.monitor_noise_z``, 2 by default; 0: any fall counts).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Verdict:
    """What the monitor says after a point."""

    overoptimized: bool
    """The reward rose and the monitor fell at each of the last ``patience`` points."""
    best: dict[str, Any]
    """The point with the highest monitor reward so far (the first of equals)."""
    is_best: bool
    """This point is that one."""
    message: str = ""
    stop: bool = False
    """``overoptimized`` and the run was asked to stop on it."""

    def fields(self) -> dict[str, Any]:
        """What a round's row or a logged step records of the verdict."""
        return {"overoptimized": self.overoptimized, "monitor_best_at": self.best["at"]}


@dataclass
class OveroptimizationMonitor:
    """Points ``{"at", "reward", "monitor", "kl"}`` in order; :meth:`add` judges each one.

    ``unit`` names a point in messages ("round", "step"); ``at`` is its round or step."""

    patience: int
    stop: bool = False
    unit: str = "round"
    noise_z: float = 2.0
    points: list[dict[str, Any]] = field(default_factory=list)

    def add(
        self, at: Any, reward: float, monitor: float, kl: float, monitor_sem: float | None = None
    ) -> Verdict:
        """A point; ``monitor_sem``: the standard error of ``monitor`` (None: unknown, any fall counts)."""
        self.points.append(
            {"at": at, "reward": reward, "monitor": monitor, "kl": kl, "monitor_sem": monitor_sem}
        )
        return self.verdict()

    def _beyond_noise(self, first: dict[str, Any], last: dict[str, Any]) -> bool:
        before, after = first.get("monitor_sem"), last.get("monitor_sem")
        if not self.noise_z or not (_finite(before) and _finite(after)):
            return True
        error = math.hypot(float(before or 0.0), float(after or 0.0))
        return bool(first["monitor"] - last["monitor"] > self.noise_z * error)

    def best(self) -> dict[str, Any]:
        scored = [p for p in self.points if _finite(p["monitor"])]
        return max(scored or self.points, key=lambda p: p["monitor"] if _finite(p["monitor"]) else -math.inf)

    def verdict(self) -> Verdict:
        """The verdict on the last point."""
        last, best = self.points[-1], self.best()
        window = self.points[-(self.patience + 1) :]
        parted = (
            len(window) == self.patience + 1
            and all(
                b["reward"] > a["reward"] and b["monitor"] < a["monitor"]
                for a, b in itertools.pairwise(window)
            )
            and self._beyond_noise(window[0], last)
        )
        if not parted:
            return Verdict(False, best, best is last)
        first = window[0]
        message = (
            f"overoptimization: over the last {self.patience} {self.unit}s the reward rose from "
            f"{first['reward']:+.3f} to {last['reward']:+.3f} while the monitor fell from {first['monitor']:+.3f} "
            f"to {last['monitor']:+.3f} (KL {first['kl']:.2f} -> {last['kl']:.2f} nats); the monitor was best at "
            f"{self.unit} {best['at']} ({best['monitor']:+.3f}, KL {best['kl']:.2f})"
        )
        if self.stop:
            message += f"; stopping, final/ is the policy of {self.unit} {best['at']}"
        else:
            message += "; reward.stop_on_overoptimization=true would stop the run there"
        return Verdict(True, best, best is last, message, self.stop)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run judges as an uninterrupted one."""
        return {"monitor_points": [dict(p) for p in self.points]}

    def restore(self, saved: dict[str, Any]) -> None:
        self.points = [dict(p) for p in saved.get("monitor_points", [])]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
