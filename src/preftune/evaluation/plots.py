"""PNG figures of ``preftune eval`` and the experiments (matplotlib, the ``plot`` extra).

Each function draws one figure from plain numbers and writes it atomically; without
matplotlib it returns False and draws nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig: Any, png: Path) -> None:
    """Write ``png`` under a temporary name first, so no half-written figure is left."""
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".tmp-{png.name}")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, png)
    pyplot().close(fig)


def grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    ylabel: str,
    ceiling: Sequence[float | None] | None = None,
) -> None:
    """Bars of each series side by side per group (None: no bar), optional dashed ceilings."""
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        shown = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
        if shown:
            bars = ax.bar(
                [x for x, _ in shown], [v for _, v in shown], width, label=label, color=COLORS[k % 7]
            )
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if ceiling:
        for i, value in enumerate(ceiling):
            if value is not None:
                ax.hlines(value, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def eval_plots(
    summary: dict[str, Any], per_pair: dict[str, list[dict[str, Any]]], output: Path
) -> list[Path]:
    """``preftune eval``'s three figures; returns the paths written."""
    plt = pyplot()
    if plt is None:
        return []
    sets = list(summary["sets"])
    written = []

    methods = {
        "DPO-RM": "dpo_rm_accuracy",
        "DPO-RM per token": "dpo_rm_accuracy_length_normalized",
        "ref-free sum": "dpo_rm_accuracy_ref_free_sum",
        "EX-RM": "ex_rm_accuracy",
        "avg log-prob (policy)": "ranking_consistency_policy",
        "avg log-prob (reference)": "ranking_consistency_reference",
    }
    series = {label: [summary["sets"][s][key] for s in sets] for label, key in methods.items()}
    series = {label: values for label, values in series.items() if any(v is not None for v in values)}
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(sets) + 3), 3.8))
    grouped_bars(ax, sets, series, "share of pairs ranked chosen first")
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("accuracy per set and method", fontsize=10)
    fig.tight_layout()
    save(fig, output / "accuracy.png")
    written.append(output / "accuracy.png")

    if any(summary["sets"][s]["drift_by_edit_distance"] for s in sets):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        # One x position per bucket over all sets, in order of distance.
        labels = {
            b["low"]: b["edit_distance"] for s in sets for b in summary["sets"][s]["drift_by_edit_distance"]
        }
        position = {low: i for i, low in enumerate(sorted(labels))}
        for k, name in enumerate(sets):
            buckets = summary["sets"][name]["drift_by_edit_distance"]
            xs = [position[b["low"]] for b in buckets]
            color = COLORS[k % 7]
            ax.plot(xs, [b["chosen_logp_drift"] for b in buckets], "o-", color=color, label=f"{name}: chosen")
            ax.plot(
                xs, [b["rejected_logp_drift"] for b in buckets], "s--", color=color, label=f"{name}: rejected"
            )
        ax.set_xticks(range(len(position)), [labels[low] for low in sorted(labels)])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("token edit distance between chosen and rejected")
        ax.set_ylabel("log π − log π_ref (nats)")
        ax.set_title("likelihood drift by edit distance", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, output / "drift_by_edit_distance.png")
        written.append(output / "drift_by_edit_distance.png")

        fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.4), squeeze=False)
        for ax, name in zip(axes[0], sets, strict=True):
            rows = per_pair[name]
            values = [r[key] for r in rows for key in ("chosen_logp_drift", "rejected_logp_drift")]
            bins = [min(values) + (max(values) - min(values)) * i / 30 for i in range(31)]
            for key, label, color in (
                ("chosen_logp_drift", "chosen", "tab:blue"),
                ("rejected_logp_drift", "rejected", "tab:red"),
            ):
                ax.hist([r[key] for r in rows], bins=bins, alpha=0.55, color=color, label=label)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_title(f"{name}: log π − log π_ref", fontsize=9)
            ax.set_xlabel("nats")
            ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, output / "drift_histogram.png")
        written.append(output / "drift_histogram.png")
    return written


def online_plot(rows: Sequence[dict[str, Any]], png: Path) -> bool:
    """Online DPO by round: the samples' mean reward and the policy's KL to the initial one."""
    plt = pyplot()
    if plt is None or not rows:
        return False
    labels = [str(row["round"]) if row["round"] == "final" else f"{row['round']}" for row in rows]
    xs = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    rewards = [row["reward_mean"] for row in rows]
    left.plot(xs, [math.nan if r is None else r for r in rewards], "o-", color=COLORS[0], label="reward")
    left.set_ylabel("mean reward of the samples")
    if any(row.get("monitor_mean") is not None for row in rows):  # the monitor, on an axis of its own
        twin = left.twinx()
        watched = [row.get("monitor_mean") for row in rows]
        twin.plot(
            xs, [math.nan if w is None else w for w in watched], "s--", color=COLORS[2], label="monitor"
        )
        twin.set_ylabel("mean monitor reward (not trained on)", color=COLORS[2])
    right.errorbar(
        xs,
        [row["kl_to_initial"] for row in rows],
        yerr=[row.get("kl_to_initial_stderr") or 0.0 for row in rows],
        fmt="o-",
        color=COLORS[1],
    )
    right.set_ylabel("KL(π ‖ π_initial), nats per sequence")
    for ax in (left, right):
        ax.set_xticks(xs, labels)
        ax.set_xlabel("samples of the policy that starts round (final: after the last)")
        ax.grid(alpha=0.3)
    fig.suptitle("online DPO by round", fontsize=10)
    fig.tight_layout()
    save(fig, png)
    return True


def frontier_plot(points: Sequence[dict[str, Any]], reference_reward: float, png: Path) -> bool:
    """True reward against KL(π‖π_ref), one line per method (``preftune experiment frontier``)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    methods = list(dict.fromkeys(p["method"] for p in points))
    markers = {
        "DPO": "o",
        "PPO (true reward)": "s",
        "PPO (reward model)": "D",
        "online DPO": "^",
        "best-of-N": "x",
    }
    for color, method in zip(COLORS, methods, strict=False):
        ours = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        ax.plot(
            [0.0] + [p["kl"] for p in ours] if method == "best-of-N" else [p["kl"] for p in ours],
            [reference_reward] + [p["reward"] for p in ours]
            if method == "best-of-N"
            else [p["reward"] for p in ours],
            marker=markers.get(method, "o"),
            linestyle="--" if method == "best-of-N" else ":",
            color=color,
            label=method,
        )
        for p in ours:
            ax.annotate(
                p["setting"], (p["kl"], p["reward"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.scatter([0.0], [reference_reward], color="black", zorder=3, label="reference (SFT)")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence (held-out samples; best-of-N: analytic)")
    ax.set_ylabel("true reward of held-out samples")
    ax.set_title("reward–KL frontier on the synthetic sentiment task", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save(fig, png)
    return True


def data_report_plot(panels: Mapping[str, Mapping[str, Sequence[float]]], png: Path) -> bool:
    """``check-data``'s figure: a histogram per panel (edit distance, length difference, off-policy
    excess of chosen and rejected, reward margin), two panels a row, the report's thresholds dashed."""
    plt = pyplot()
    shown = {title: series for title, series in panels.items() if any(len(v) for v in series.values())}
    if plt is None or not shown:
        return False
    thresholds = {"edit distance": 0.5, "below the model": 1.0}
    rows = math.ceil(len(shown) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.4 * rows), squeeze=False)
    for k, (ax, (title, series)) in enumerate(zip(axes.flat, shown.items(), strict=False)):
        values = [v for vs in series.values() for v in vs]
        bins = [min(values) + (max(values) - min(values) or 1) * i / 30 for i in range(31)]
        for j, (label, data) in enumerate(series.items()):
            ax.hist(list(data), bins=bins, alpha=0.6, color=COLORS[(k + j) % 7], label=label or None)
        for key, line in thresholds.items():
            if key in title:
                ax.axvline(line, color="black", linestyle="dashed", linewidth=1)
        ax.axvline(0, color="gray", linewidth=0.6)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    save(fig, png)
    return True
