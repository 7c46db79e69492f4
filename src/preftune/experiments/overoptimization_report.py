"""The ``overoptimization`` experiment's write-up: each curve's shape, the plot on Gao et al.'s axes
(true and optimized reward against √KL), the report, and the same over several seeds
(:func:`sweep_report`)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.plots import COLORS, pyplot, save
from .common import Lab, markdown_table, text_table

NAME = "overoptimization"
METHODS = ("best-of-n", "online DPO", "PPO")
FALL = 0.1
"""A curve whose true reward ends this much below its peak (in the true reward's units, −1 to +1)
counts as overoptimized: about 2.5 standard errors of a PPO point's mean (128 samples), so that a
flat curve's noise (its highest point is above its last by chance) does not count."""


def dip(points: Sequence[dict[str, Any]]) -> float:
    """The largest fall of the true reward from one point to a later one at which the optimized
    reward was no lower: Gao et al.'s signature (the proxy rises, the gold reward falls), seen even
    where the curve recovers later. A fall of both is not counted: that is a run going wrong, not
    a proxy being exploited."""
    falls = [
        a["true"] - b["true"]
        for i, a in enumerate(points)
        for b in points[i + 1 :]
        if b["proxy"] >= a["proxy"]
    ]
    return max([0.0, *falls])


def shape(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A curve's peak true reward and the KL there, its last point (the policy the optimization
    ended with; best-of-n: the largest n), the fall from the peak to it, and its deepest
    :func:`dip`."""
    peak = max(points, key=lambda p: p["true"])
    end = points[-1]
    return {
        "dip": dip(points),
        "start_true": points[0]["true"],
        "peak_true": peak["true"],
        "peak_kl": peak["kl"],
        "peak_at": peak["at"],
        "end_true": end["true"],
        "end_kl": end["kl"],
        "end_proxy": end["proxy"],
        "proxy_gain": end["proxy"] - points[0]["proxy"],
        "fall": peak["true"] - end["true"],
        "overoptimized": peak["true"] - end["true"] > FALL,
    }


def write_up(lab: Lab, results: dict[str, Any], curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``results.json``, ``report.md`` and the plot; returns the results."""
    results = {**results, "curves": curves, "shapes": {key: shape(points) for key, points in curves.items()}}
    png = lab.output / f"{NAME}.png"
    plotted = plot({lab.seed: curves}, png)
    if plotted:
        results["plot"] = str(png)
    header, rows = table(results["shapes"])
    print("\n" + text_table(header, rows) + "\n")
    lab.write(NAME, results, report_text(lab, results, header, rows, plotted))
    print(f"report: {lab.output / 'report.md'}  ({lab.seconds():.0f} s)")
    return results


def table(shapes: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "reward optimized",
        "start",
        "peak",
        "KL at peak",
        "end",
        "KL at end",
        "fall from peak",
        "deepest dip",
    ]
    rows = []
    for key, s in shapes.items():
        method, label = key.split("|")
        rows.append(
            [method, label, f"{s['start_true']:+.3f}", f"{s['peak_true']:+.3f}", f"{s['peak_kl']:.2f}",
             f"{s['end_true']:+.3f}", f"{s['end_kl']:.2f}", f"{s['fall']:.3f}" + (" ↓" if s["overoptimized"] else ""),
             f"{s['dip']:.3f}"]
        )  # fmt: skip
    return header, rows


def report_text(
    lab: Lab, results: dict[str, Any], header: list[str], rows: list[list[str]], plotted: bool
) -> str:
    sizes, accuracy = results["sizes"], results["proxy_accuracy"]
    members = [v for k, v in accuracy.items() if k.startswith("eval_accuracy/member_")]
    lines = [
        f"# {NAME} (seed {lab.seed}{', quick' if lab.quick else ''})",
        "",
        "Gao et al. 2022: optimizing a learned proxy reward, the gold reward rises, peaks and falls as KL grows.",
        "Coste et al. 2023: an ensemble's min or mean − λ·std largely removes the fall. Here the true reward of",
        f"the synthetic task is the gold one; {sizes['members']} proxy reward models learned from "
        f"{accuracy['pairs']} Bradley–Terry pairs (held-out accuracy: members "
        + ", ".join(f"{100 * m:.1f}%" for m in members)
        + f"; the ensemble's mean {100 * accuracy.get('eval_accuracy/mean', math.nan):.1f}%; Bayes ceiling "
        f"{100 * accuracy['bayes']:.1f}%). Member 0 is the single proxy. True reward (−1 to +1) of the policy's",
        "samples; KL to the starting policy in nats (best-of-n: the analytic KL; the plot's axis is √KL); "
        f"end: the last policy (best-of-n: the largest n); ↓: fell more than {FALL} from its peak; deepest dip: "
        "the largest fall of the true reward between two points while the optimized reward did not fall.",
        "",
        markdown_table(header, rows),
        "",
        "What it shows:",
        "",
        *findings(results["shapes"]),
        confound(members[0], accuracy.get("eval_accuracy/mean", math.nan)),
    ]
    if plotted:
        lines += ["", f"![{NAME}]({NAME}.png)"]
    return "\n".join(lines)


def findings(shapes: dict[str, dict[str, Any]]) -> list[str]:
    """Sentences computed from the shapes: how far the single proxy overoptimized, per method, and
    how much each aggregate changed that."""
    lines = []
    for method in METHODS:
        single = shapes.get(f"{method}|single proxy")
        if single is None:
            continue
        verdict = (
            f"overoptimized it: the true reward peaked at {single['peak_true']:+.3f} (KL "
            f"{single['peak_kl']:.2f} nats) and fell by {single['fall']:.3f} to {single['end_true']:+.3f} at the "
            f"end (KL {single['end_kl']:.2f}), the proxy {single['proxy_gain']:+.3f} above its start"
            if single["overoptimized"]
            else f"did not overoptimize it (by this measure): the true reward ended at {single['end_true']:+.3f}, "
            f"{single['fall']:.3f} below its peak of {single['peak_true']:+.3f}"
        )
        others = [
            f"{label} {s['fall']:.3f} (peak {s['peak_true']:+.3f}, end {s['end_true']:+.3f} at KL {s['end_kl']:.2f})"
            for key, s in shapes.items()
            if key.startswith(f"{method}|") and not key.endswith("single proxy")
            for label in [key.split("|")[1]]
        ]
        dipped = (
            f" On the way its true reward dipped by {single['dip']:.3f} while the proxy rose."
            if single["dip"] > FALL
            else ""
        )
        lines.append(
            f"* {method} against the single proxy {verdict}.{dipped} Falls from the peak: "
            + "; ".join(others)
            + "."
        )
    return lines


def confound(single: float, mean: float) -> str:
    """What the comparison with the single proxy measures, given the two held-out accuracies."""
    said = (
        f"* The single proxy ranks {100 * single:.1f}% of the held-out pairs right, the ensemble's mean "
        f"{100 * mean:.1f}%: "
    )
    if mean > single + 0.01:
        said += "what the mean gains over the single proxy is in part a better reward model, not caution."
    else:
        said += "no better, so what the mean changes is not a better reward model."
    return said + " Min and mean − std against the mean compare caution alone (the same members)."


def plot(by_seed: dict[int, dict[str, list[dict[str, Any]]]], png: Path) -> bool:
    """True (top) and optimized (bottom) reward against √KL, one panel per method, one colour per
    reward optimized; several seeds: one thin line each. Points are joined in the order the run
    reached them: a trained policy's KL need not grow every round."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(2, len(METHODS), figsize=(13, 7), squeeze=False)
    labels = list(dict.fromkeys(key.split("|")[1] for curves in by_seed.values() for key in curves))
    for column, method in enumerate(METHODS):
        for colour, label in zip(COLORS, labels, strict=False):
            for i, curves in enumerate(by_seed.values()):
                points = curves.get(
                    f"{method}|{label}", []
                )  # in training order: a path, not a function of KL
                xs = [math.sqrt(max(p["kl"], 0.0)) for p in points]
                style = {"color": colour, "alpha": 0.9 if len(by_seed) == 1 else 0.55, "linewidth": 1.2}
                name = label if i == 0 else None
                axes[0][column].plot(xs, [p["true"] for p in points], "o-", markersize=3, label=name, **style)
                axes[1][column].plot(xs, [p["proxy"] for p in points], "o-", markersize=3, **style)
        axes[0][column].set_title(method, fontsize=10)
        axes[1][column].set_xlabel("√KL(π ‖ π_start), √nats")
        for row in (0, 1):
            axes[row][column].grid(alpha=0.3)
    axes[0][0].set_ylabel("true reward (gold)")
    axes[1][0].set_ylabel("reward optimized (proxy)")
    axes[0][0].legend(fontsize=8)
    seeds = ", ".join(str(s) for s in by_seed)
    fig.suptitle(
        f"overoptimization on the synthetic task, seed{'s' * (len(by_seed) > 1)} {seeds}", fontsize=10
    )
    fig.tight_layout()
    save(fig, png)
    return True


# --------------------------------------------------------------------------- several seeds


def sweep_report(folders: Sequence[Path], output: Path | None = None) -> str:
    """The shapes over the seeds whose ``results.json`` the folders hold, as mean [min, max], the
    seeds each curve overoptimized in, the proxies' held-out accuracy per seed, and a plot of every
    seed (``output/overoptimization-seeds.png``).

        from preftune.experiments.overoptimization_report import sweep_report
        print(sweep_report([Path(f"sweep/overoptimization-s{s}") for s in range(5)], Path("sweep")))
    """
    runs = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    seeds = [r["seed"] for r in runs]
    header = ["method", "reward optimized", "peak true reward", "KL at peak", "true reward at the end",
              "KL at the end", "fall from peak", f"seeds that fell > {FALL}", "deepest dip",
              f"seeds that dipped > {FALL}"]  # fmt: skip
    rows = []
    for key in runs[0]["curves"]:
        method, label = key.split("|")
        values = [shape(r["curves"][key]) for r in runs]  # from the points: shapes of every version alike
        fell = [str(seed) for seed, s in zip(seeds, values, strict=True) if s["overoptimized"]]
        dipped = [str(seed) for seed, s in zip(seeds, values, strict=True) if s["dip"] > FALL]
        rows.append(
            [method, label, _spread([s["peak_true"] for s in values]), _spread([s["peak_kl"] for s in values], "{:.2f}"),
             _spread([s["end_true"] for s in values]), _spread([s["end_kl"] for s in values], "{:.2f}"),
             _spread([s["fall"] for s in values], "{:.3f}"), _count(fell, len(runs)),
             _spread([s["dip"] for s in values], "{:.3f}"), _count(dipped, len(runs))]
        )  # fmt: skip
    if output is not None:
        plot({r["seed"]: r["curves"] for r in runs}, output / f"{NAME}-seeds.png")
    tables = [markdown_table(header, rows)]
    if all("proxy_accuracy" in r for r in runs):
        tables.append(accuracy_table(runs))
    return "\n\n".join(tables)


def accuracy_table(runs: Sequence[dict[str, Any]]) -> str:
    """Per seed, the proxies' held-out accuracy (%): the single proxy (member 0), the members'
    mean, each aggregate, the Bayes ceiling; and the members' disagreement (the mean std of their
    rewards on the held-out texts)."""
    header = ["seed", "single proxy", "members (mean)", "ensemble mean", "ensemble min", "mean − std", "Bayes",
              "disagreement"]  # fmt: skip
    rows = []
    for run in runs:
        a = run["proxy_accuracy"]
        members = [v for k, v in a.items() if k.startswith("eval_accuracy/member_")]
        aggregates = [
            f"{100 * a.get(f'eval_accuracy/{how}', math.nan):.1f}"
            for how in ("mean", "min", "mean_minus_std")
        ]
        rows.append([run["seed"], f"{100 * members[0]:.1f}", f"{100 * statistics.mean(members):.1f}", *aggregates,
                     f"{100 * a['bayes']:.1f}", f"{a.get('eval_disagreement', math.nan):.2f}"])  # fmt: skip
    return markdown_table(header, rows)


def _count(seeds: Sequence[str], runs: int) -> str:
    return f"{len(seeds)} of {runs}" + (f" ({', '.join(seeds)})" if seeds else "")


def _spread(values: Sequence[float], fmt: str = "{:+.3f}") -> str:
    return f"{fmt.format(statistics.mean(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"
