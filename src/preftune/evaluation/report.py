"""What ``preftune eval`` shows and writes: the console table, ``eval.json``, per-pair rows, plots.

Files are written under temporary names and renamed, so an interrupted run leaves either the
previous file or the new one, never half of one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..data.files import write_json, write_jsonl
from .evaluate import EvalResult
from .plots import eval_plots

# (label, key in a set's summary, format); "samples.KEY" reads the set's sample report.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("pairs", "pairs", "{:d}"),
    ("DPO-RM accuracy  (β log π/π_ref)", "dpo_rm_accuracy", "{:.1%}"),
    ("DPO-RM mean margin", "dpo_rm_margin", "{:+.3f}"),
    ("DPO-RM accuracy, per-token ratio", "dpo_rm_accuracy_length_normalized", "{:.1%}"),
    ("reference-free accuracy, sum", "dpo_rm_accuracy_ref_free_sum", "{:.1%}"),
    ("reference-free accuracy, norm", "dpo_rm_accuracy_ref_free_norm", "{:.1%}"),
    ("EX-RM accuracy", "ex_rm_accuracy", "{:.1%}"),
    ("EX-RM mean margin", "ex_rm_margin", "{:+.3f}"),
    ("EX-RM accuracy, weakest member", "ex_rm_member_accuracy_min", "{:.1%}"),
    ("EX-RM accuracy, best member", "ex_rm_member_accuracy_max", "{:.1%}"),
    ("EX-RM members' disagreement (std)", "ex_rm_disagreement", "{:.3f}"),
    ("avg log-prob ranks chosen 1st, policy", "ranking_consistency_policy", "{:.1%}"),
    ("avg log-prob ranks chosen 1st, reference", "ranking_consistency_reference", "{:.1%}"),
    ("log p(chosen) − ref", "chosen_logp_drift", "{:+.2f}"),
    ("log p(rejected) − ref", "rejected_logp_drift", "{:+.2f}"),
    ("chosen likelihood fell", "chosen_fell_share", "{:.1%}"),
    ("mean token edit distance", "mean_edit_distance", "{:.1f}"),
    ("samples: KL(π‖π_ref), nats", "samples.kl_policy_reference", "{:.3f}"),
    ("samples: reward, policy", "samples.reward_policy", "{:+.3f}"),
    ("samples: reward, reference", "samples.reward_reference", "{:+.3f}"),
    ("samples: policy win rate", "samples.win_rate_policy_vs_reference", "{:.1%}"),
)


def _cell(report: dict[str, Any], key: str, fmt: str) -> str | None:
    if key.startswith("samples."):
        report = report.get("samples") or {}
        key = key.removeprefix("samples.")
        if not report:
            return None
    if key not in report:  # a figure only some rewards have (an ensemble's members)
        return None
    value = report.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def format_table(summary: dict[str, Any]) -> str:
    """One column per set, one row per figure; rows no set has (no samples) are left out."""
    sets = summary["sets"]
    width = max(12, *(len(name) + 2 for name in sets))
    lines = [f"{'':42}" + "".join(f"{name:>{width}}" for name in sets)]
    for label, key, fmt in ROWS:
        cells = [_cell(report, key, fmt) for report in sets.values()]
        if all(cell is None for cell in cells):
            continue
        lines.append(f"{label:42}" + "".join(f"{cell or '—':>{width}}" for cell in cells))
    buckets = [
        (name, b)
        for name, report in sets.items()
        for b in report["drift_by_edit_distance"]
        if report["pairs"]
    ]
    if buckets:
        lines += ["", "drift by token edit distance (chosen / rejected, share of pairs whose chosen fell):"]
        for name, b in buckets:
            lines.append(
                f"  {name:>{width - 2}}  {b['edit_distance']:>9}  {b['pairs']:6d} pairs  "
                f"{b['chosen_logp_drift']:+8.2f} / {b['rejected_logp_drift']:+8.2f}  {b['chosen_fell_share']:6.1%}"
            )
    return "\n".join(lines)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "set"


def write_outputs(result: EvalResult, output: Path) -> list[Path]:
    """``eval.json``, ``pairs/NAME.jsonl`` (one row per pair) and the PNG plots."""
    written = []
    for name, rows in result.per_pair.items():
        path = output / "pairs" / f"{safe_name(name)}.jsonl"
        write_jsonl(path, rows)
        written.append(path)
    plots = eval_plots(result.summary, result.per_pair, output)
    summary = {**result.summary, "plots": [str(p) for p in plots]}
    write_json(output / "eval.json", summary)
    return [output / "eval.json", *written, *plots]
