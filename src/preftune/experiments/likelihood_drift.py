"""``likelihood-drift``: DPO can lower the chosen response's likelihood while the margin grows.

Pal et al. 2024 (arXiv 2402.13228, the DPOP paper): the standard DPO loss can reduce
``log π(y_w)`` as long as ``log π(y_l)`` falls faster, and this is worst when chosen and rejected
differ in a few tokens. DPOP adds ``λ · max(0, log π_ref(y_w) − log π(y_w))`` inside the sigmoid.

In miniature: a tiny Llama is taught to write 20–24-word reviews (the reference). For each
k ∈ {1, 2, 4, 8, 16}, pairs are built from one random review in which k words are positive in
chosen and negative in rejected — the two differ in exactly k tokens, and chosen is truly better.
DPO and DPOP each train a copy of the reference on the pairs of one k; ``preftune eval`` then
measures ``log π − log π_ref`` of chosen and rejected on those training pairs and on held-out
pairs of the same k, and the chosen drift is split into the k substituted tokens and the shared rest.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DataConfig
from ..data import TokenizedPair
from ..data.packing import collate_for
from ..evaluation.evaluate import evaluate, load_sets
from ..evaluation.plots import COLORS, pyplot, save
from ..evaluation.settings import EvalSettings
from ..model.attention import choose_layout
from ..model.logps import LogpsRequest, sequence_logps
from .common import MAX_LENGTH, Lab, markdown_table, one_thread, percent, substituted_pair, text_table
from .synthetic import SentimentTask

NAME = "likelihood-drift"
KS = (1, 2, 4, 8, 16)
BETA = 0.1
# (label, objective settings): DPOP at a light λ and at the paper's λ = 50 (with its β = 0.3
# inside the sigmoid; here β = 0.1 for every objective, so the margins compare).
OBJECTIVES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("DPO", {"objective.loss": ["dpo"]}),
    ("DPOP λ=5", {"objective.loss": ["dpop"], "objective.dpop_lambda": 5.0}),
    ("DPOP λ=50", {"objective.loss": ["dpop"], "objective.dpop_lambda": 50.0}),
)


@dataclass(frozen=True)
class Sizes:
    sft_steps: int
    pairs_per_k: int
    held_out_per_k: int
    epochs: float


FULL = Sizes(sft_steps=80, pairs_per_k=256, held_out_per_k=256, epochs=2)
QUICK = Sizes(sft_steps=6, pairs_per_k=16, held_out_per_k=16, epochs=1)


def run(output: Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    with one_thread():
        return _run(Lab(output, seed, quick))


@torch.no_grad()
def substituted_and_shared(
    policy: nn.Module, reference: nn.Module, pairs: list[TokenizedPair], pad_token_id: int
) -> tuple[float, float]:
    """Mean over pairs of the chosen drift summed over the substituted tokens, and over the rest."""
    substituted = shared = 0.0
    collate = collate_for(choose_layout("auto", policy, reference)[0], pad_token_id)
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        batch = collate(chunk)
        ours = sequence_logps(policy, batch, LogpsRequest(per_token=True)).token_logps
        theirs = sequence_logps(reference, batch, LogpsRequest(per_token=True)).token_logps
        assert ours is not None and theirs is not None
        delta = (ours - theirs).double()
        for i, pair in enumerate(chunk):
            tokens = delta[batch.label_sequence == batch.chosen[i]]
            differs = torch.tensor([a != b for a, b in zip(pair.chosen_ids, pair.rejected_ids, strict=True)])
            substituted += tokens[differs].sum().item()
            shared += tokens[~differs].sum().item()
    return substituted / len(pairs), shared / len(pairs)


def _run(lab: Lab) -> dict[str, Any]:
    sizes = QUICK if lab.quick else FULL
    task = SentimentTask(min_words=20, max_words=24)
    lab.say("1/3 SFT: the reference writes 20–24-word reviews")
    reference = lab.sft(task, sizes.sft_steps)
    rng = random.Random(1000 * lab.seed + 1)
    data_cfg = DataConfig(max_length=MAX_LENGTH)

    lab.say(
        f"2/3 for k in {KS}: {' / '.join(label for label, _ in OBJECTIVES)} on pairs differing in k tokens"
    )
    figures: dict[str, dict[str, Any]] = {}
    for k in KS:
        train_records = [substituted_pair(task, k, rng) for _ in range(sizes.pairs_per_k)]
        held_out = [substituted_pair(task, k, rng) for _ in range(sizes.held_out_per_k)]
        paths = [(f"train_k{k}", lab.save_records(f"train_k{k}", train_records))]
        paths.append((f"heldout_k{k}", lab.save_records(f"heldout_k{k}", held_out)))
        eval_sets = load_sets(paths, lab.tokenizer, data_cfg)
        for label, objective in OBJECTIVES:
            settings = {
                **objective,
                "objective.beta": BETA,
                "train.learning_rate": 2e-3,
                "train.epochs": sizes.epochs,
                "train.warmup_steps": 3,
            }
            run_name = f"{label.lower().replace(' ', '-').replace('=', '')}-k{k}"
            policy, _ = lab.policy(run_name, reference, train_records, settings)
            summary = evaluate(
                policy, lab.tokenizer, eval_sets, reference, settings=EvalSettings(beta=BETA, batch_size=64)
            ).summary
            train_report, held_report = (summary["sets"][name] for name, _ in paths)
            on_substituted, on_shared = substituted_and_shared(
                policy, reference, eval_sets[0].pairs, lab.tokenizer.pad_token_id
            )
            figures.setdefault(label, {})[str(k)] = {
                "chosen_logp_drift": train_report["chosen_logp_drift"],
                "rejected_logp_drift": train_report["rejected_logp_drift"],
                "chosen_fell_share": train_report["chosen_fell_share"],
                "dpo_rm_accuracy": train_report["dpo_rm_accuracy"],
                "dpo_rm_margin": train_report["dpo_rm_margin"],
                "chosen_drift_on_substituted_tokens": on_substituted,
                "chosen_drift_on_shared_tokens": on_shared,
                "mean_edit_distance": train_report["mean_edit_distance"],
                "heldout_chosen_logp_drift": held_report["chosen_logp_drift"],
                "heldout_dpo_rm_accuracy": held_report["dpo_rm_accuracy"],
            }
        lab.say(
            f"    k={k:2d}: Δ log p(chosen) "
            + ", ".join(
                f"{label} {figures[label][str(k)]['chosen_logp_drift']:+.2f}" for label, _ in OBJECTIVES
            )
        )

    lab.say("3/3 report")
    png = lab.output / f"{NAME}.png"
    plotted = plot(figures, png)
    results: dict[str, Any] = {"sizes": asdict(sizes), "beta": BETA, "ks": list(KS), "objectives": figures}
    if plotted:
        results["plot"] = str(png)
    tables = make_tables(figures)
    for header, rows in tables:
        print("\n" + text_table(header, rows))
    lab.write(NAME, results, report_text(lab, figures, tables, plotted))
    print(f"\nreport: {lab.output / 'report.md'}  ({lab.seconds():.0f} s)")
    return results


def make_tables(figures: dict[str, dict[str, Any]]) -> list[tuple[list[str], list[list[str]]]]:
    labels = list(figures)
    drift = (
        ["k"]
        + [f"Δ log p(chosen), {label}" for label in labels]
        + [f"accuracy %, {label}" for label in labels]
        + ["Δ log p(chosen), DPO, held-out"],
        [
            [str(k)]
            + [f"{figures[label][str(k)]['chosen_logp_drift']:+.2f}" for label in labels]
            + [percent(figures[label][str(k)]["dpo_rm_accuracy"]) for label in labels]
            + [f"{figures['DPO'][str(k)]['heldout_chosen_logp_drift']:+.2f}"]
            for k in KS
        ],
    )
    dpo = figures["DPO"]
    split = (
        [
            "k",
            "DPO: Δ chosen, k substituted tokens",
            "Δ chosen, shared tokens",
            "Δ log p(rejected)",
            "margin β·(Δw − Δl)",
            "chosen fell %",
        ],
        [
            [
                str(k),
                f"{dpo[str(k)]['chosen_drift_on_substituted_tokens']:+.2f}",
                f"{dpo[str(k)]['chosen_drift_on_shared_tokens']:+.2f}",
                f"{dpo[str(k)]['rejected_logp_drift']:+.2f}",
                f"{dpo[str(k)]['dpo_rm_margin']:+.2f}",
                percent(dpo[str(k)]["chosen_fell_share"]),
            ]
            for k in KS
        ],
    )
    return [drift, split]


def plot(figures: dict[str, dict[str, Any]], png: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
    for color, (label, by_k) in zip(COLORS, figures.items(), strict=False):
        axes[0].plot(KS, [by_k[str(k)]["chosen_logp_drift"] for k in KS], "o-", color=color, label=label)
    axes[0].set_title("log π(chosen) − log π_ref(chosen) on the training pairs", fontsize=9)
    dpo = figures["DPO"]
    for key, label, style in (
        ("chosen_drift_on_substituted_tokens", "chosen: the k substituted tokens", "o-"),
        ("chosen_drift_on_shared_tokens", "chosen: the shared tokens", "s-"),
        ("rejected_logp_drift", "rejected: all tokens", "^--"),
    ):
        axes[1].plot(KS, [dpo[str(k)][key] for k in KS], style, label=label)
    axes[1].set_title("DPO: where the likelihood moved", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens in which chosen and rejected differ (k)")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, png)
    return True


def span(values: Any, fmt: str = "{:.1f}") -> str:
    """``low–high`` of some numbers (percentages by default), or the one value when they agree."""
    values = list(values)
    scale = 100 if fmt == "{:.1f}" else 1
    low, high = (fmt.format(scale * v) for v in (min(values), max(values)))
    return low if low == high else f"{low} to {high}"


def report_text(
    lab: Lab,
    figures: dict[str, dict[str, Any]],
    tables: list[tuple[list[str], list[list[str]]]],
    plotted: bool,
) -> str:
    dpo = figures["DPO"]
    fell = [k for k in KS if dpo[str(k)]["chosen_logp_drift"] < 0]
    lines = [
        f"# {NAME} (seed {lab.seed}{', quick' if lab.quick else ''})",
        "",
        "Pal et al. 2024 (arXiv 2402.13228): DPO can lower the chosen response's likelihood while the margin",
        "grows, worst when chosen and rejected differ in a few tokens; DPOP's penalty prevents it. Here every",
        "pair is one random review in which k words are positive in chosen and negative in rejected; each",
        f"objective (β = {BETA}) trains a copy of the reference on the pairs of one k. Δ is log π − log π_ref,",
        "in nats, on the training pairs; accuracy is DPO's implicit reward ranking chosen first.",
        "",
        markdown_table(*tables[0]),
        "",
        markdown_table(*tables[1]),
        "",
        "What it shows:",
        "",
        f"* DPO lowered log p(chosen) for k ∈ {{{', '.join(map(str, fell))}}}"
        if fell
        else "* DPO did not lower log p(chosen) for any k",
        f"  (from {dpo[str(KS[0])]['chosen_logp_drift']:+.2f} nats at k = {KS[0]} to "
        f"{dpo[str(KS[-1])]['chosen_logp_drift']:+.2f} at k = {KS[-1]}), while its implicit reward ranked "
        f"{span(dpo[str(k)]['dpo_rm_accuracy'] for k in KS)}% of the pairs correctly and its mean margin was "
        f"{span((dpo[str(k)]['dpo_rm_margin'] for k in KS), '{:+.2f}')}.",
        f"* The fall is in the shared tokens: at k = {KS[0]} they lost "
        f"{-dpo[str(KS[0])]['chosen_drift_on_shared_tokens']:.2f} nats while the substituted one gained "
        f"{dpo[str(KS[0])]['chosen_drift_on_substituted_tokens']:+.2f}.",
    ]
    for label in list(figures)[1:]:
        by_k = figures[label]
        lines.append(
            f"* {label}: Δ log p(chosen) from {by_k[str(KS[0])]['chosen_logp_drift']:+.2f} (k = {KS[0]}) to "
            f"{by_k[str(KS[-1])]['chosen_logp_drift']:+.2f} (k = {KS[-1]}); accuracy "
            + ", ".join(f"{percent(by_k[str(k)]['dpo_rm_accuracy'])}" for k in KS)
            + "% for k = "
            + ", ".join(map(str, KS))
            + "."
        )
    if plotted:
        lines += ["", f"![{NAME}]({NAME}.png)"]
    return "\n".join(lines)
