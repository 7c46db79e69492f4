"""``frontier``: the reward–KL frontier of DPO, PPO, online DPO and best-of-N.

Rafailov et al. 2023 (arXiv 2305.18290, Fig. 2): on controlled sentiment generation, with the
true reward known, DPO reaches more reward than PPO at every KL(π‖π_ref) — its frontier dominates
PPO's, even PPO's with the true reward in the loop (PPO-GT).

In miniature: a tiny Llama taught to write reviews is the reference. It samples two reviews for
each of a set of prompts; Bradley–Terry draws on the true reward label them. On those pairs, DPO
trains at several β and a reward model learns. PPO trains at several KL coefficients, once with
the true reward itself and once with the learned reward model; online DPO samples, scores with
the true reward and trains round after round. Best-of-N sampling from the reference is the
analytic reference: its KL is log N − (N−1)/N (an upper bound; Beirami et al. 2024, arXiv
2401.01879). Every policy is measured the same way: samples on held-out prompts (topics never
trained on) give the true reward reached and the sequence-level KL(π‖π_ref).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ModelConfig
from ..data import Text
from ..evaluation.plots import frontier_plot
from ..evaluation.samples import sample_report
from ..evaluation.settings import EvalSettings
from ..generation.rewards import load_scorer
from ..generation.rollout import eos_ids
from ..generation.sampling import generate
from ..model.load import load_model
from ..recipes.online import train_online
from ..recipes.ppo import train_ppo
from ..recipes.reward import train_reward_model
from .common import Lab, bradley_terry, markdown_table, one_thread, text_table
from .ranking_consistency import TrueReward
from .synthetic import TOPICS, SentimentTask, tiny_reward_model

NAME = "frontier"
TRAIN_TOPICS, HELD_OUT_TOPICS = TOPICS[:8], TOPICS[8:]
DPO_BETAS = (0.1, 0.3, 1.0, 3.0)
PPO_KL_COEFS = (0.01, 0.05, 0.2, 0.5)
BEST_OF = (1, 2, 4, 8, 16, 32, 64)
MAX_NEW_TOKENS = 16
"""Samples for pairs, rollouts and measurements alike are cut here (the reviews take 5–8 tokens)."""


@dataclass(frozen=True)
class Sizes:
    sft_steps: int
    pair_prompts: int
    dpo_epochs: float
    ppo_steps: int
    rollouts_per_step: int
    online_prompts: int
    online_rounds: int
    samples_per_prompt: int
    """Held-out samples per held-out prompt, for each policy measured (and for the reference)."""
    best_of_pool: int
    """Reference samples per held-out prompt from which best-of-N is computed."""


FULL = Sizes(80, 2000, 2, 30, 32, 128, 3, 64, 256)
QUICK = Sizes(6, 32, 1, 2, 8, 8, 1, 2, 8)


def run(output: Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    with one_thread():
        return _run(Lab(output, seed, quick))


@dataclass
class Frontier:
    """The points measured so far: each policy's true reward and KL(π‖π_ref), from samples for the
    held-out prompts (``settings``: how many, how long, from which seed)."""

    lab: Lab
    reference: nn.Module
    held_out: dict[tuple[int, ...], Text]
    settings: EvalSettings
    points: list[dict[str, Any]] = field(default_factory=list)

    def report(self, policy: nn.Module) -> dict[str, Any]:
        """:func:`~preftune.evaluation.samples.sample_report` of ``policy`` against the reference."""
        tokenizer = self.lab.tokenizer
        return sample_report(policy, self.reference, tokenizer, self.held_out, TrueReward(), self.settings)

    def measure(self, method: str, setting: str, policy: nn.Module, run: str | None) -> None:
        report = self.report(policy)
        self.points.append(
            {
                "method": method,
                "setting": setting,
                "kl": report["kl_policy_reference"],
                "kl_stderr": report["kl_policy_reference_stderr"],
                "reward": report["reward_policy"],
                "win_rate_vs_reference": report["win_rate_policy_vs_reference"],
                "tokens": report["tokens_policy"],
                "run": run,
            }
        )
        point = self.points[-1]
        self.lab.say(f"    {method} {setting}: true reward {point['reward']:+.3f}, KL {point['kl']:.2f} nats")


def _run(lab: Lab) -> dict[str, Any]:
    sizes = QUICK if lab.quick else FULL
    task = SentimentTask()
    lab.say("1/6 SFT: the reference writes reviews")
    reference = lab.sft(task, sizes.sft_steps)
    held_out: dict[tuple[int, ...], Text] = {
        tuple(lab.tokenizer(task.prompt(t))["input_ids"]): task.prompt(t) for t in HELD_OUT_TOPICS
    }
    measured = EvalSettings(
        samples=sizes.samples_per_prompt, max_new_tokens=MAX_NEW_TOKENS, seed=1000 * lab.seed + 11
    )
    frontier = Frontier(lab, reference, held_out, measured)

    lab.say("2/6 preference pairs from the reference's own samples, labelled by Bradley–Terry draws")
    records = reference_pairs(lab, task, reference, sizes.pair_prompts)
    reference_reward = frontier.report(reference)["reward_reference"]

    lab.say(f"3/6 DPO at β = {', '.join(map(str, DPO_BETAS))} on {len(records)} pairs")
    for beta in DPO_BETAS:
        settings = {
            "objective.loss": ["dpo"],
            "objective.beta": beta,
            "train.learning_rate": 1e-3,
            "train.epochs": sizes.dpo_epochs,
            "train.warmup_steps": 5,
        }
        policy, _ = lab.policy(f"dpo-beta{beta}", reference, records, settings)
        frontier.measure("DPO", f"β={beta}", policy, f"dpo-beta{beta}")

    lab.say("4/6 a reward model on the same pairs; PPO with the true reward and with the reward model")
    prompts = [{"prompt": p} for p in train_prompts(task, max(sizes.pair_prompts, 64), 1000 * lab.seed + 3)]
    ppo_points(frontier, records, prompts, sizes)

    lab.say("5/6 online DPO with the true reward, round by round")
    online_points(frontier, prompts[: sizes.online_prompts], sizes)

    lab.say(f"6/6 best-of-N from the reference, N = {', '.join(map(str, BEST_OF))}")
    frontier.points += best_of_n(lab, reference, list(held_out), sizes.best_of_pool)
    return write_up(lab, sizes, len(records), frontier.points, reference_reward)


def ppo_points(
    frontier: Frontier, records: list[dict[str, str]], prompts: list[dict[str, str]], sizes: Sizes
) -> None:
    """A reward model learns from ``records`` (on the reference's backbone, with a new head); PPO
    trains at each KL coefficient with the true reward, then with that reward model."""
    lab, reference = frontier.lab, frontier.reference
    reward_model = tiny_reward_model(len(lab.tokenizer), seed=lab.seed)
    reward_model.load_state_dict(
        {k: v for k, v in reference.state_dict().items() if k.startswith("model.")}, strict=False
    )  # the reference's backbone; the head is new
    rm_settings = {"train.learning_rate": 3e-3, "train.epochs": 2, "train.warmup_steps": 5}
    lab.train("rm", train_reward_model, reward_model, records, rm_settings)
    learned = load_scorer(str(lab.output / "runs" / "rm" / "final"), batch_size=64, device="cpu")
    for label, scorer in (("PPO (true reward)", TrueReward()), ("PPO (reward model)", learned)):
        for coef in PPO_KL_COEFS:
            run = f"ppo-{'gt' if 'true' in label else 'rm'}-kl{coef}"
            policy = copy.deepcopy(reference)
            settings = {
                "ppo.kl_coef": coef,
                "ppo.steps": sizes.ppo_steps,
                "ppo.rollouts_per_step": sizes.rollouts_per_step,
                "ppo.num_mini_batches": 2 if sizes.rollouts_per_step >= 16 else 1,
                "rollout.max_new_tokens": MAX_NEW_TOKENS,
                "train.learning_rate": 1e-3,
                "train.scheduler": "constant",
            }
            quietly(
                lab, run, train_ppo, lab.config(run, settings), model=policy, prompts=prompts, scorer=scorer
            )
            frontier.measure(label, f"β={coef}", policy.eval(), run)


def online_points(frontier: Frontier, prompts: list[dict[str, str]], sizes: Sizes) -> None:
    """Online DPO from the reference, scoring its samples with the true reward; each round's policy
    is measured."""
    lab = frontier.lab
    online_settings = {
        "objective.loss": ["dpo"],
        "objective.beta": 0.1,
        "train.learning_rate": 1e-3,
        "online.rounds": sizes.online_rounds,
        "online.samples_per_prompt": 4,
        "online.final_samples": False,
        "rollout.max_new_tokens": MAX_NEW_TOKENS,
    }
    quietly(
        lab, "online", train_online, lab.config("online", online_settings),
        model=copy.deepcopy(frontier.reference), prompts=prompts, scorer=TrueReward(),
    )  # fmt: skip
    for r in range(1, sizes.online_rounds + 1):
        folder = lab.output / "runs" / "online" / f"round-{r:02d}" / "train" / "final"
        policy = load_model(ModelConfig(), str(folder)).eval()
        frontier.measure("online DPO", f"round {r}", policy, f"online/round-{r:02d}")


def write_up(
    lab: Lab, sizes: Sizes, pairs: int, points: list[dict[str, Any]], reference_reward: float
) -> dict[str, Any]:
    """``results.json``, ``report.md``, the plot and the table on the console; returns the results."""
    png = lab.output / f"{NAME}.png"
    plotted = frontier_plot(points, reference_reward, png)
    results: dict[str, Any] = {
        "sizes": asdict(sizes),
        "dpo_betas": list(DPO_BETAS),
        "ppo_kl_coefs": list(PPO_KL_COEFS),
        "pairs": pairs,
        "reference_reward": reference_reward,
        "points": points,
        "dominance": dominance(points),
        "gaps_to_dpo": gaps_to_dpo(points, reference_reward),
    }
    if plotted:
        results["plot"] = str(png)
    header, rows = table(points, reference_reward)
    print("\n" + text_table(header, rows) + "\n")
    lab.write(NAME, results, report_text(lab, results, header, rows, plotted))
    print(f"report: {lab.output / 'report.md'}  ({lab.seconds():.0f} s)")
    return results


def quietly(lab: Lab, run: str, fit: Callable[..., Any], config: Any, **kwargs: Any) -> Any:
    """``fit(config, tokenizer=lab.tokenizer, **kwargs)`` with its console output in ``runs/<run>.log``."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = fit(config, tokenizer=lab.tokenizer, **kwargs)
    path = lab.output / "runs" / f"{run}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log.getvalue(), encoding="utf-8")
    return result


def train_prompts(task: SentimentTask, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [task.prompt(rng.choice(TRAIN_TOPICS)) for _ in range(count)]


def reference_pairs(lab: Lab, task: SentimentTask, reference: nn.Module, count: int) -> list[dict[str, str]]:
    """Two samples of the reference per prompt (the DPO paper's on-policy pairs), labelled by a
    Bradley–Terry draw on the true reward; identical or empty pairs are left out."""
    prompts = train_prompts(task, count, 1000 * lab.seed + 1)
    ids = [lab.tokenizer(p)["input_ids"] for p in prompts for _ in range(2)]
    stop = eos_ids(reference, lab.tokenizer)
    samples = generate(reference, ids, lab.tokenizer.pad_token_id, stop, MAX_NEW_TOKENS, 1000 * lab.seed + 2)
    texts = lab.tokenizer.batch_decode(samples, skip_special_tokens=True)
    rng, records = random.Random(1000 * lab.seed + 4), []
    for i, prompt in enumerate(prompts):
        a, b = texts[2 * i], texts[2 * i + 1]
        if a.strip() and b.strip() and a != b:
            records.append(bradley_terry(task, prompt, a, b, rng)[0])
    return records


def expected_best(rewards: Sequence[float], n: int) -> float:
    """E[max of n draws without replacement from ``rewards``]: the sorted rewards weighted by the
    chance that each is the largest of a random n-subset, ``C(i, n−1) / C(M, n)`` for the (i+1)-th
    smallest — exact for the pool, no resampling noise."""
    ordered, total = sorted(rewards), math.comb(len(rewards), n)
    return sum(r * math.comb(i, n - 1) for i, r in enumerate(ordered)) / total


def best_of_n(
    lab: Lab, reference: nn.Module, prompt_ids: list[tuple[int, ...]], pool: int
) -> list[dict[str, Any]]:
    """Best-of-N by the true reward from a pool of reference samples per held-out prompt; its KL is
    the analytic log N − (N−1)/N."""
    ids = [list(p) for p in prompt_ids for _ in range(pool)]
    stop = eos_ids(reference, lab.tokenizer)
    samples = generate(reference, ids, lab.tokenizer.pad_token_id, stop, MAX_NEW_TOKENS, 1000 * lab.seed + 13)
    texts = lab.tokenizer.batch_decode(samples, skip_special_tokens=True)
    rewards = [SentimentTask.true_reward(t) for t in texts]
    points = []
    for n in (n for n in BEST_OF if n <= pool):
        per_prompt = [expected_best(rewards[k * pool : (k + 1) * pool], n) for k in range(len(prompt_ids))]
        points.append(
            {
                "method": "best-of-N",
                "setting": f"N={n}",
                "kl": math.log(n) - (n - 1) / n,
                "kl_stderr": 0.0,
                "reward": sum(per_prompt) / len(per_prompt),
                "run": None,
            }
        )
    return points


def dominance(points: list[dict[str, Any]]) -> dict[str, Any]:
    """For each of DPO, PPO (true reward) and PPO (reward model) and each other one: which of its
    points the other dominates (a point with at least its reward at no more KL)."""
    methods = ("DPO", "PPO (true reward)", "PPO (reward model)")
    out: dict[str, Any] = {}
    for method in methods:
        ours = [p for p in points if p["method"] == method]
        for other in methods:
            theirs = [p for p in points if p["method"] == other]
            if other != method:
                beaten = [
                    p["setting"]
                    for p in ours
                    if any(q["kl"] <= p["kl"] and q["reward"] >= p["reward"] for q in theirs)
                ]
                out[f"{method} dominated by {other}"] = {"points": len(ours), "dominated": beaten}
    return out


def gaps_to_dpo(points: list[dict[str, Any]], reference_reward: float) -> dict[str, list[dict[str, Any]]]:
    """Each other point's reward minus DPO's at the same KL, reading DPO's frontier as straight lines
    between its points (and the reference at KL 0); points beyond DPO's largest KL are left out."""
    frontier = [
        (0.0, reference_reward),
        *sorted((p["kl"], p["reward"]) for p in points if p["method"] == "DPO"),
    ]
    out: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p["method"] == "DPO" or not 0 <= p["kl"] <= frontier[-1][0]:
            continue
        (k0, r0), (k1, r1) = next((a, b) for a, b in itertools.pairwise(frontier) if a[0] <= p["kl"] <= b[0])
        dpo = r0 + (r1 - r0) * (p["kl"] - k0) / (k1 - k0) if k1 > k0 else max(r0, r1)
        out.setdefault(p["method"], []).append(
            {"setting": p["setting"], "kl": p["kl"], "gap": p["reward"] - dpo}
        )
    return out


def table(points: list[dict[str, Any]], reference_reward: float) -> tuple[list[str], list[list[str]]]:
    header = ["method", "setting", "KL(π‖π_ref), nats", "true reward", "gain over reference", "sample tokens"]
    rows = [["reference", "—", "0.00", f"{reference_reward:+.3f}", "—", "—"]]
    for p in points:
        kl = f"{p['kl']:.2f}" + (f" ± {p['kl_stderr']:.2f}" if p["kl_stderr"] else " (analytic)")
        gain = f"{p['reward'] - reference_reward:+.3f}"
        tokens = f"{p['tokens']:.1f}" if p.get("tokens") is not None else "—"
        rows.append([p["method"], p["setting"], kl, f"{p['reward']:+.3f}", gain, tokens])
    return header, rows


def report_text(
    lab: Lab, results: dict[str, Any], header: list[str], rows: list[list[str]], plotted: bool
) -> str:
    points = results["points"]
    lines = [
        f"# {NAME} (seed {lab.seed}{', quick' if lab.quick else ''})",
        "",
        "Rafailov et al. 2023 (arXiv 2305.18290, Fig. 2): with the true reward known, DPO's reward–KL frontier",
        "dominates PPO's, even PPO's trained on the true reward. Here every policy starts from the same SFT",
        f"reference; {results['pairs']} on-policy pairs labelled by Bradley–Terry draws train DPO and a reward model;",
        "PPO trains with the true reward and with that reward model; online DPO scores its own samples with the",
        "true reward; best-of-N from the reference has the analytic KL log N − (N−1)/N. Rewards and KL are",
        "measured on samples for prompts no policy trained on.",
        "",
        markdown_table(header, rows),
        "",
        "What it shows:",
        "",
    ]
    best = {
        method: max((p for p in points if p["method"] == method), key=lambda p: p["reward"])
        for method in dict.fromkeys(p["method"] for p in points)
    }
    for method, p in best.items():
        lines.append(
            f"* {method}: the highest true reward is {p['reward']:+.3f} ({p['setting']}, KL {p['kl']:.2f} nats)."
        )
    for method, gaps in results["gaps_to_dpo"].items():
        shown = ", ".join(f"{g['gap']:+.3f} at {g['kl']:.2f} nats ({g['setting']})" for g in gaps)
        lines.append(f"* {method} against DPO's frontier at the same KL: {shown}.")
    for name, verdict in results["dominance"].items():
        beaten = verdict["dominated"]
        lines.append(
            f"* {name} (as much reward at no more KL): {len(beaten)} of {verdict['points']} points"
            f"{' (' + ', '.join(beaten) + ')' if beaten else ''}."
        )
    dominance = results["dominance"]
    paper = all(
        len(dominance[f"{ppo} dominated by DPO"]["dominated"])
        == dominance[f"{ppo} dominated by DPO"]["points"]
        and not dominance[f"DPO dominated by {ppo}"]["dominated"]
        for ppo in ("PPO (true reward)", "PPO (reward model)")
    )
    lines += [
        "",
        "The paper's finding, DPO's frontier above both PPO frontiers, "
        + ("holds here." if paper else "does not hold here: see the points above."),
    ]
    if plotted:
        lines += ["", f"![{NAME}]({NAME}.png)"]
    return "\n".join(lines)
