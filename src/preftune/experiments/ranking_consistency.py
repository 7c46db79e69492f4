"""``ranking-consistency``: does DPO's reward rank pairs the way generation does?

Meng et al. 2024 (arXiv 2405.14734, the SimPO paper): a policy generates by (roughly) the
average log-prob, but DPO's reward is the summed log-ratio to a reference; after DPO, only about
half of the training pairs have a higher average log-prob for chosen than for rejected. SimPO
makes the average log-prob itself the reward.

In miniature: the reference is a tiny Llama taught to write reviews in a style of its own — some
words far more often than others, whatever their sentiment — so its average log-prob ranks pairs
by style, not by the true reward. DPO and SimPO each train a copy of it on off-policy
Bradley–Terry pairs (uniformly random reviews), gently (learning rate 5e-4) and strongly (2e-3).
``preftune eval`` then measures, on training and held-out pairs, the share ranked chosen-first by
the average log-prob ("ranking consistency"), and samples from every model give the true reward
reached, the win rate over the reference and the KL to it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..data import Text
from ..evaluation.evaluate import evaluate, load_sets
from ..evaluation.plots import COLORS, grouped_bars, pyplot, save
from ..evaluation.samples import sample_report
from ..evaluation.settings import EvalSettings
from .common import MAX_LENGTH, Lab, markdown_table, one_thread, percent, text_table
from .synthetic import NEGATIVE, POSITIVE, TOPICS, SentimentTask

NAME = "ranking-consistency"
RATES = {"gentle": 5e-4, "strong": 2e-3}
OBJECTIVES: dict[str, dict[str, Any]] = {
    "DPO": {"objective.loss": ["dpo"], "objective.beta": 0.1},
    "SimPO": {"objective.loss": ["simpo"]},
}
"""SimPO at its registry defaults: β = 2, γ = 0.5."""


class StyledTask(SentimentTask):
    """Reviews whose words follow a Zipf law over a fixed shuffle of the task's words: the style
    a reference has of its own, unrelated to the true reward."""

    def random_response(self, rng: random.Random) -> str:
        words = random.Random(99).sample(POSITIVE + NEGATIVE, len(POSITIVE + NEGATIVE))
        weights = [1 / (rank + 1) ** 1.5 for rank in range(len(words))]
        count = rng.randint(self.min_words, self.max_words)
        return " " + " ".join(rng.choices(words, weights, k=count))


class TrueReward:
    """The task's true reward as a scorer (``fn(prompts, completions) -> list[float]``); keeps the
    completions it last scored, so the samples themselves can be looked at."""

    name = "true reward"

    def __init__(self) -> None:
        self.completions: list[str] = []

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        self.completions = [str(c) for c in completions]
        return [SentimentTask.true_reward(c) for c in self.completions]


def on_task_share(completions: Sequence[str]) -> float:
    """Share of the samples' words that are task words at all (degenerate text has few)."""
    words = [w for c in completions for w in c.split()]
    return sum(w in POSITIVE or w in NEGATIVE for w in words) / max(len(words), 1)


@dataclass(frozen=True)
class Sizes:
    sft_steps: int
    train_pairs: int
    held_out_pairs: int
    epochs: float
    trajectory_pairs: int
    eval_every: int
    samples_per_prompt: int


FULL = Sizes(80, 1500, 1000, 2, 300, 10, 40)
QUICK = Sizes(6, 64, 32, 1, 16, 1, 2)


def run(output: Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    with one_thread():
        return _run(Lab(output, seed, quick))


def _run(lab: Lab) -> dict[str, Any]:
    sizes = QUICK if lab.quick else FULL
    task = SentimentTask()
    lab.say("1/4 SFT: the reference writes reviews in a style of its own")
    reference = lab.sft(StyledTask(), sizes.sft_steps)
    train_records, train_bayes = task.bradley_terry_pairs(sizes.train_pairs, 1000 * lab.seed + 1)
    held_out, held_out_bayes = task.bradley_terry_pairs(sizes.held_out_pairs, 1000 * lab.seed + 2)
    paths = [
        ("train", lab.save_records("train", train_records)),
        ("heldout", lab.save_records("heldout", held_out)),
    ]
    eval_sets = load_sets(paths, lab.tokenizer, DataConfig(max_length=MAX_LENGTH))
    prompts: dict[tuple[int, ...], Text] = {
        tuple(lab.tokenizer(task.prompt(topic))["input_ids"]): task.prompt(topic) for topic in TOPICS
    }

    def measure(model: Any, label: str) -> dict[str, Any]:
        batched = EvalSettings(batch_size=64)
        sets = evaluate(model, lab.tokenizer, eval_sets, reference, settings=batched).summary["sets"]
        scorer = TrueReward()
        sampling = EvalSettings(samples=sizes.samples_per_prompt, max_new_tokens=16, seed=lab.seed)
        samples = sample_report(model, reference, lab.tokenizer, prompts, scorer, sampling)
        policy_samples = scorer.completions[: len(scorer.completions) // 2]
        return {
            "ranking_consistency_train": sets["train"]["ranking_consistency_policy"],
            "ranking_consistency_heldout": sets["heldout"]["ranking_consistency_policy"],
            "dpo_rm_accuracy_train": sets["train"]["dpo_rm_accuracy"],
            "dpo_rm_accuracy_heldout": sets["heldout"]["dpo_rm_accuracy"],
            "chosen_logp_drift_train": sets["train"]["chosen_logp_drift"],
            "true_reward": samples["reward_policy"],
            "win_rate_vs_reference": samples["win_rate_policy_vs_reference"] if label != "reference" else 0.5,
            "kl_to_reference": samples["kl_policy_reference"],
            "sample_tokens": samples["tokens_policy"],
            "on_task_word_share": on_task_share(policy_samples),
            "example_samples": policy_samples[:: max(len(policy_samples) // 4, 1)][:4],
        }

    lab.say("2/4 the reference, measured")
    models: dict[str, dict[str, Any]] = {"reference": measure(reference, "reference")}
    trajectories: dict[str, list[dict[str, float]]] = {}
    lab.say(f"3/4 DPO and SimPO on {len(train_records)} pairs, at learning rates {RATES}")
    for regime, rate in RATES.items():
        for objective, settings in OBJECTIVES.items():
            label = f"{objective} ({regime})"
            schedule: dict[str, Any] = {"train.learning_rate": rate, "train.epochs": sizes.epochs}
            schedule.update({"train.warmup_steps": 5, "train.eval_every": sizes.eval_every})
            policy, result = lab.policy(
                f"{objective.lower()}-{regime}",
                reference,
                train_records,
                {**settings, **schedule},
                train_records[: sizes.trajectory_pairs],
            )
            models[label] = measure(policy, label)
            trajectories[label] = trajectory(result.history)
            lab.say(
                f"    {label}: ranking {percent(models[label]['ranking_consistency_train'])}% of training pairs, "
                f"true reward {models[label]['true_reward']:+.3f}"
            )

    lab.say("4/4 report")
    bayes = {"train": train_bayes, "heldout": held_out_bayes}
    return write_up(lab, sizes, bayes, models, trajectories)


def trajectory(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The training run's evaluations: ranking consistency and the objective's own reward accuracy."""
    return [
        {
            "step": h["step"],
            "ranking_consistency": h["eval_ranking/policy"],
            # the objective's own reward: β log π/π_ref for DPO, β·mean log π for SimPO
            "own_reward_accuracy": h["eval_rewards/accuracies"],
        }
        for h in history
        if "eval_ranking/policy" in h
    ]


def write_up(
    lab: Lab,
    sizes: Sizes,
    bayes: dict[str, float],
    models: dict[str, dict[str, Any]],
    trajectories: dict[str, list[dict[str, float]]],
) -> dict[str, Any]:
    """``results.json``, ``report.md``, the plot and the table on the console; returns the results."""
    png = lab.output / f"{NAME}.png"
    plotted = plot(models, trajectories, models["reference"]["ranking_consistency_train"], png)
    results: dict[str, Any] = {
        "sizes": asdict(sizes),
        "learning_rates": RATES,
        "bayes_accuracy": bayes,
        "models": models,
        "trajectories": trajectories,
    }
    if plotted:
        results["plot"] = str(png)
    header, rows = table(models)
    print("\n" + text_table(header, rows))
    lab.write(NAME, results, report_text(lab, models, trajectories, header, rows, results, plotted))
    print(f"\nreport: {lab.output / 'report.md'}  ({lab.seconds():.0f} s)")
    return results


def table(models: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "ranking %, train",
        "ranking %, held-out",
        "DPO-RM acc %, train",
        "true reward",
        "win rate % vs ref",
        "KL to ref (nats)",
        "task words %",
    ]
    rows = [
        [
            label,
            percent(m["ranking_consistency_train"]),
            percent(m["ranking_consistency_heldout"]),
            "—" if label == "reference" else percent(m["dpo_rm_accuracy_train"]),
            f"{m['true_reward']:+.3f}",
            "—" if label == "reference" else percent(m["win_rate_vs_reference"]),
            f"{m['kl_to_reference']:.2f}",
            percent(m["on_task_word_share"]),
        ]
        for label, m in models.items()
    ]
    return header, rows


def plot(
    models: dict[str, dict[str, Any]],
    trajectories: dict[str, list[dict[str, float]]],
    start: float,
    png: Path,
) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for color, (label, points) in zip(COLORS, trajectories.items(), strict=False):
        steps = [0] + [p["step"] for p in points]
        axes[0].plot(
            steps, [start] + [p["ranking_consistency"] for p in points], "-", color=color, label=label
        )
        if label.startswith("DPO"):  # at step 0 every implicit reward is 0: no ranking to draw
            own = [p["own_reward_accuracy"] for p in points]
            axes[0].plot(steps[1:], own, ":", color=color, label=f"{label}: its implicit reward")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("share of training pairs")
    axes[0].set_ylim(0.3, 1.0)
    axes[0].set_title("chosen ranked first by mean log-prob (solid) / by DPO's reward (dotted)", fontsize=9)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    names = list(models)
    series = {
        "ranking, train": [models[n]["ranking_consistency_train"] for n in names],
        "ranking, held-out": [models[n]["ranking_consistency_heldout"] for n in names],
    }
    grouped_bars(axes[1], [n.replace(" (", "\n(") for n in names], series, "share of pairs")
    axes[1].set_ylim(0.3, 1.02)
    axes[1].set_title("after training (the true reward reached is in the report)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save(fig, png)
    return True


def report_text(
    lab: Lab,
    models: dict[str, dict[str, Any]],
    trajectories: dict[str, list[dict[str, float]]],
    header: list[str],
    rows: list[list[str]],
    results: dict[str, Any],
    plotted: bool,
) -> str:
    ref = models["reference"]
    lines = [
        f"# {NAME} (seed {lab.seed}{', quick' if lab.quick else ''})",
        "",
        "Meng et al. 2024 (arXiv 2405.14734): after DPO only about half of the training pairs have a higher",
        "average log-prob for chosen than for rejected, because DPO's reward (a summed log-ratio to the",
        "reference) is not the metric generation follows; SimPO rewards the average log-prob itself.",
        "Here the reference has a style of its own (a Zipf law over the task's words, unrelated to sentiment);",
        "DPO (β = 0.1) and SimPO (β = 2, γ = 0.5) train on off-policy Bradley–Terry pairs, gently",
        f"(lr {RATES['gentle']}) and strongly (lr {RATES['strong']}). Ranking = share of pairs whose chosen has the",
        "higher mean log-prob; the Bayes ceiling against these noisy labels is "
        f"{percent(results['bayes_accuracy']['train'])}% (train) and {percent(results['bayes_accuracy']['heldout'])}% (held-out).",
        "",
        markdown_table(header, rows),
        "",
        "What it shows:",
        "",
        f"* The reference ranks {percent(ref['ranking_consistency_train'])}% of training pairs chosen-first: its",
        "  likelihood follows its style, not the reward.",
    ]
    for regime in RATES:
        dpo, simpo = models[f"DPO ({regime})"], models[f"SimPO ({regime})"]
        gap = 100 * (dpo["dpo_rm_accuracy_train"] - dpo["ranking_consistency_train"])
        lines.append(
            f"* {regime.capitalize()} training: DPO's implicit reward ranks {percent(dpo['dpo_rm_accuracy_train'])}% of "
            f"training pairs correctly, its mean log-prob {percent(dpo['ranking_consistency_train'])}% "
            f"({abs(gap):.1f} points {'fewer' if gap > 0 else 'more'}); SimPO's mean log-prob ranks "
            f"{percent(simpo['ranking_consistency_train'])}%. True reward reached: DPO {dpo['true_reward']:+.3f}, "
            f"SimPO {simpo['true_reward']:+.3f} (reference {ref['true_reward']:+.3f})."
        )
    for label, m in models.items():
        if m["on_task_word_share"] < min(0.9, ref["on_task_word_share"] - 0.1):
            lines.append(
                f"* {label} writes degenerate text: {percent(m['on_task_word_share'])}% of its sampled words are "
                f"task words at all (the reference's: {percent(ref['on_task_word_share'])}%; KL "
                f"{m['kl_to_reference']:.1f} nats), e.g. {m['example_samples'][0]!r}."
                + (
                    " A loss without a reference holds nothing else in place."
                    if label.startswith("SimPO")
                    else ""
                )
            )
    first = trajectories["DPO (gentle)"][0] if trajectories.get("DPO (gentle)") else None
    if first and first["own_reward_accuracy"] > 0:
        lines.append(
            f"* Early in gentle DPO training (step {first['step']}) the implicit reward already ranks "
            f"{percent(first['own_reward_accuracy'])}% of the tracked training pairs correctly, the mean log-prob "
            f"{percent(first['ranking_consistency'])}%."
        )
    if plotted:
        lines += ["", f"![{NAME}]({NAME}.png)"]
    return "\n".join(lines)
