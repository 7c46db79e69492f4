"""``online-vs-offline``: does DPO on the policy's own samples, labelled by a reward model, beat
DPO on a fixed off-policy preference set of the same size?

Xiong et al. 2024 (RLHFlow, arXiv 2405.07863): iterative DPO with a reward model took an SFT
model from 12.5 to 30.9 length-controlled AlpacaEval 2 in three rounds, well past offline DPO
on the same labelling budget, because offline pairs were written by other policies.

In miniature, on the synthetic sentiment task (true reward known):

* the starting policy is a tiny Llama taught to write reviews (SFT);
* **offline**: DPO on N Bradley–Terry-labelled pairs of random reviews (the usual dataset);
* a Bradley–Terry reward model learns from another M such pairs;
* **online**: R rounds; each samples K completions for N / R prompts from the current policy,
  scores them with that reward model, pairs best against worst and trains one round: N labelled
  pairs at most, and the same number of optimizer steps as offline.

Each policy is sampled on every task prompt: the true reward's mean, the win rate against the
starting policy's samples (ties count half), and the KL to the starting policy it spent.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ModelConfig
from ..data import Text
from ..evaluation.plots import grouped_bars, pyplot, save
from ..evaluation.samples import sample_report
from ..evaluation.settings import EvalSettings
from ..generation.scoring import RewardModelScorer
from ..model.load import load_model
from ..recipes.online import OnlineResult, train_online
from ..recipes.reward import train_reward_model
from .common import Lab, markdown_table, one_thread, percent, text_table
from .synthetic import TOPICS, SentimentTask, tiny_reward_model

NAME = "online-vs-offline"


@dataclass(frozen=True)
class Sizes:
    sft_steps: int
    pairs: int
    """N: labelled pairs each of offline and online may use."""
    rm_pairs: int
    rounds: int
    samples_per_prompt: int
    steps: int
    """Optimizer steps of each policy (online: split evenly over the rounds)."""
    eval_samples: int
    """Samples of each policy per task prompt (one prompt per topic)."""


FULL = Sizes(
    sft_steps=80,
    pairs=768,
    rm_pairs=1500,
    rounds=3,
    samples_per_prompt=4,
    steps=48,
    eval_samples=48,
)
QUICK = Sizes(
    sft_steps=6,
    pairs=32,
    rm_pairs=64,
    rounds=2,
    samples_per_prompt=2,
    steps=4,
    eval_samples=2,
)
SETTINGS = {"objective.loss": ["dpo"], "objective.beta": 0.1, "train.learning_rate": 1e-3}
MAX_NEW_TOKENS = 16


class TrueReward:
    """The task's true reward; remembers what it last scored, so the same samples can be scored again."""

    name = "true reward"

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        self.prompts, self.completions = list(prompts), list(completions)
        return [SentimentTask.true_reward(str(c)) for c in completions]


def run(output: Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    with one_thread():
        return _run(Lab(output, seed, quick))


def _run(lab: Lab) -> dict[str, Any]:
    sizes = QUICK if lab.quick else FULL
    task, base = SentimentTask(), 1000 * lab.seed
    lab.say("1/5 SFT: the starting policy")
    start = lab.sft(task, sizes.sft_steps)

    lab.say(f"2/5 offline DPO on {sizes.pairs} Bradley–Terry-labelled pairs of random reviews")
    offline_pairs, _ = task.bradley_terry_pairs(sizes.pairs, base + 1)
    offline, _ = lab.policy("offline", start, offline_pairs, {**SETTINGS, "train.max_steps": sizes.steps})

    lab.say(f"3/5 a Bradley–Terry reward model on {sizes.rm_pairs} other pairs")
    rm_pairs, rm_bayes = task.bradley_terry_pairs(sizes.rm_pairs, base + 2)
    reward_model = tiny_reward_model(len(lab.tokenizer), seed=lab.seed)
    backbone = {k: v for k, v in start.state_dict().items() if k.startswith("model.")}
    reward_model.load_state_dict(backbone, strict=False)
    lab.train(
        "rm", train_reward_model, reward_model, rm_pairs, {"train.learning_rate": 3e-3, "train.epochs": 2}
    )
    scorer = RewardModelScorer(str(lab.output / "runs" / "rm" / "final"), batch_size=64, device="cpu")

    prompts_per_round = sizes.pairs // sizes.rounds
    lab.say(
        f"4/5 online DPO: {sizes.rounds} rounds x {prompts_per_round} prompts x {sizes.samples_per_prompt} "
        "samples, scored by the reward model, best against worst"
    )
    online, online_result = online_dpo(lab, task, start, scorer, sizes)

    lab.say(f"5/5 {sizes.eval_samples} samples of each policy per task prompt, scored by the true reward")
    policies = {"starting policy (SFT)": start, "offline DPO": offline, "online DPO": online}
    figures = {label: measure(lab, task, model, start, scorer, sizes) for label, model in policies.items()}
    rounds = [
        {k: row[k] for k in ("round", "reward_mean", "kl_to_initial", "pairs", "ties", "train_accuracy")}
        for row in online_result.rounds
    ]
    png = lab.output / f"{NAME}.png"
    plotted = plot(figures, png)
    results: dict[str, Any] = {
        "sizes": asdict(sizes),
        "reward_model_bayes_ceiling": rm_bayes,
        "policies": figures,
        "online_rounds": rounds,
    }
    if plotted:
        results["plot"] = str(png)
    header, rows = table(figures)
    print("\n" + text_table(header, rows) + "\n")
    lab.write(NAME, results, report_text(lab, sizes, figures, rounds, header, rows, plotted))
    print(f"report: {lab.output / 'report.md'}  ({lab.seconds():.0f} s)")
    return results


def online_dpo(
    lab: Lab, task: SentimentTask, start: nn.Module, scorer: RewardModelScorer, sizes: Sizes
) -> tuple[nn.Module, OnlineResult]:
    """Online DPO from ``start``, its samples scored by ``scorer``: the final policy and the run's result."""
    online_config = lab.config(
        "online",
        {
            **SETTINGS,
            "train.max_steps": sizes.steps // sizes.rounds,
            "online.rounds": sizes.rounds,
            "online.samples_per_prompt": sizes.samples_per_prompt,
            "online.prompts_per_round": sizes.pairs // sizes.rounds,
            "online.final_samples": False,
            "rollout.max_new_tokens": MAX_NEW_TOKENS,
            "rollout.batch_size": 64,
        },
    )
    # Each round draws fresh prompts, as RLHFlow's rounds each take a new slice of the prompt set.
    round_prompts = task.prompts(sizes.pairs, 1000 * lab.seed + 3)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = train_online(
            online_config,
            model=copy.deepcopy(start),
            tokenizer=lab.tokenizer,
            prompts=[{"prompt": p} for p in round_prompts],
            scorer=scorer,
        )
    (lab.output / "runs" / "online.log").write_text(log.getvalue(), encoding="utf-8")
    return load_model(ModelConfig(), str(result.final_dir)).eval(), result


def measure(
    lab: Lab, task: SentimentTask, model: nn.Module, start: nn.Module, scorer: RewardModelScorer, sizes: Sizes
) -> dict[str, Any]:
    """Samples of ``model`` and of ``start`` for every task prompt: the true reward, the win rate
    against the start, the KL to it, and the reward model's score of ``model``'s samples."""
    prompt_map: dict[tuple[int, ...], Text] = {
        tuple(lab.tokenizer(task.prompt(topic))["input_ids"]): task.prompt(topic) for topic in TOPICS
    }
    true_reward = TrueReward()
    settings = EvalSettings(samples=sizes.eval_samples, max_new_tokens=MAX_NEW_TOKENS, seed=lab.seed)
    report = sample_report(model, start, lab.tokenizer, prompt_map, true_reward, settings)
    half = len(true_reward.completions) // 2  # the policy's samples come first, then the start's
    rm_scores = scorer(true_reward.prompts[:half], true_reward.completions[:half])
    return {
        "true_reward": report["reward_policy"],
        # Against itself a policy wins half the time by definition; sampled, it would be noise.
        "win_rate_vs_start": report["win_rate_policy_vs_reference"] if model is not start else 0.5,
        "kl_to_start": report["kl_policy_reference"],
        "kl_to_start_stderr": report["kl_policy_reference_stderr"],
        "reward_model_score": sum(rm_scores) / len(rm_scores),
        "sample_tokens": report["tokens_policy"],
    }


def table(figures: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["policy", "true reward", "win rate vs start (%)", "KL to start (nats)", "RM score", "tokens"]
    rows = [
        [
            label,
            f"{f['true_reward']:+.3f}",
            percent(f["win_rate_vs_start"]),
            f"{f['kl_to_start']:.2f} ± {f['kl_to_start_stderr']:.2f}",
            f"{f['reward_model_score']:+.3f}",
            f"{f['sample_tokens']:.1f}",
        ]
        for label, f in figures.items()
    ]
    return header, rows


def plot(figures: dict[str, dict[str, Any]], png: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    labels = list(figures)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    grouped_bars(
        axes[0], labels, {"true reward": [figures[n]["true_reward"] for n in labels]}, "mean true reward"
    )
    grouped_bars(axes[1], labels, {"KL": [figures[n]["kl_to_start"] for n in labels]}, "KL to start (nats)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("offline vs online DPO, same labelled pairs and optimizer steps", fontsize=10)
    fig.tight_layout()
    save(fig, png)
    return True


def report_text(
    lab: Lab,
    sizes: Sizes,
    figures: dict[str, dict[str, Any]],
    rounds: list[dict[str, Any]],
    header: list[str],
    rows: list[list[str]],
    plotted: bool,
) -> str:
    off, on = figures["offline DPO"], figures["online DPO"]
    lines = [
        f"# {NAME} (seed {lab.seed}{', quick' if lab.quick else ''})",
        "",
        "Xiong et al. 2024 (arXiv 2405.07863): iterative DPO on the policy's own samples, labelled by a reward",
        "model, beats offline DPO on the same labelling budget. Here: offline DPO on "
        f"{sizes.pairs} labelled pairs of random reviews,",
        f"online DPO for {sizes.rounds} rounds on at most as many pairs of its own samples labelled by a reward",
        f"model, each for {sizes.steps} optimizer steps; measured on samples scored by the true reward.",
        "",
        markdown_table(header, rows),
        "",
        "Online rounds (samples of the policy that starts each round, scored by the reward model):",
        "",
        markdown_table(
            ["round", "RM reward", "KL to start", "pairs", "ties", "train accuracy"],
            [
                [
                    r["round"],
                    f"{r['reward_mean']:+.3f}",
                    f"{r['kl_to_initial']:.2f}",
                    r["pairs"],
                    r["ties"],
                    percent(r["train_accuracy"]),
                ]
                for r in rounds
            ],
        ),
        "",
        "What it shows:",
        "",
        f"* Online DPO reached a true reward of {on['true_reward']:+.3f} against offline's {off['true_reward']:+.3f} "
        f"(win rates against the start {percent(on['win_rate_vs_start'])}% and {percent(off['win_rate_vs_start'])}%): "
        + (
            "online is ahead, as Xiong et al. found."
            if on["true_reward"] > off["true_reward"]
            else "offline is ahead here."
        ),
        f"* It spent {on['kl_to_start']:.2f} nats of KL to the start, offline {off['kl_to_start']:.2f}: at equal steps "
        "online moves further, because its pairs are where the policy puts its mass; comparing at equal KL is "
        "what `preftune experiment frontier` is for.",
        f"* The reward model scores online's samples {on['reward_model_score']:+.3f} and offline's "
        f"{off['reward_model_score']:+.3f}; online optimizes that model directly, so the gap between its score and the "
        "true reward is where over-optimization of a learned reward would show.",
    ]
    if plotted:
        lines += ["", f"![{NAME}]({NAME}.png)"]
    return "\n".join(lines)
