"""``overoptimization``: reward-model overoptimization in miniature, and what ensembles change.

Gao et al. 2022 (arXiv 2210.10760): optimizing a learned *proxy* reward, the *gold* reward rises,
peaks and falls as the policy moves away from its start (they plot both against √KL), while the
proxy keeps rising. Coste et al. 2023 (arXiv 2310.02743): optimizing an ensemble's worst case
(``min``) or its uncertainty-weighted mean (``mean − λ·std``) largely removes the fall in best-of-n
and PPO; Eisenstein et al. 2023 (arXiv 2312.09244): ensembles help but do not remove it.

In miniature, on the synthetic task whose true reward is known (it plays the gold reward):

* a tiny Llama taught to write reviews (SFT) is the starting policy;
* proxy reward models learn from a few hundred Bradley–Terry pairs: an ensemble of K
  (``rm train --ensemble K``), whose member 0 is the **single proxy** (one reward model trained as
  a user would train one: every pair, its own seed);
* best-of-n (from a pool of the starting policy's samples), online DPO and PPO each optimize
  (a) the single proxy, (b) the ensemble's mean, (c) its min, (d) its mean − λ·std, with the true
  reward as the run's monitor (``reward.monitor``: it scores the same samples, trains nothing);
* each run gives a curve: the true reward and the optimized reward of the policy's samples against
  √KL to the start (best-of-n: the analytic KL). Each curve's peak true reward, the KL there, its
  true reward at the largest KL and the fall from the peak say how far it overoptimized.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data import Text
from ..evaluation.samples import best_of_n
from ..generation.aggregate import aggregate_rows
from ..generation.ensemble import EnsembleScorer
from ..generation.rollout import eos_ids
from ..generation.sampling import generate
from ..recipes.online import train_online
from ..recipes.ppo import train_ppo
from ..recipes.reward import train_reward_model
from .common import Lab, one_thread
from .overoptimization_report import write_up
from .synthetic import TOPICS, SentimentTask, tiny_reward_model

NAME = "overoptimization"
REWARDS = {
    "single proxy": "member 0",
    "ensemble mean": "mean",
    "ensemble min": "min",
    "mean − std": "mean_minus_std",
}
"""The four rewards optimized: label -> one member, or an aggregate of the ensemble."""
UNCERTAINTY_PENALTY = 1.0
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Sizes:
    sft_steps: int
    rm_pairs: int
    members: int
    pool: int
    """Best-of-n: the starting policy's samples per prompt, n up to this."""
    online_rounds: int
    online_prompts: int
    online_steps: int
    ppo_steps: int
    ppo_rollouts: int
    ppo_log_every: int
    """PPO's points: each the mean of this many steps (the logged rows)."""


FULL = Sizes(80, 300, 4, 256, 6, 96, 8, 48, 32, 4)
QUICK = Sizes(6, 32, 2, 4, 2, 4, 1, 2, 4, 1)
ONLINE = {"objective.loss": ["dpo"], "objective.beta": 0.1, "train.learning_rate": 2e-3}
PPO = {"ppo.kl_coef": 0.02, "train.learning_rate": 1e-3, "train.scheduler": "constant"}


def run(output: Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    with one_thread():
        return _run(Lab(output, seed, quick))


class TrueReward:
    """The task's true reward: the gold reward each run is watched by."""

    name = "true reward"

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        return [SentimentTask.true_reward(str(c)) for c in completions]


class Optimized:
    """One of the four rewards, read off the ensemble: member 0 alone, or an aggregate. The members'
    rewards of texts already scored are kept (``cache``, shared by the four): best-of-n scores one
    pool for each."""

    def __init__(self, ensemble: EnsembleScorer, how: str, cache: dict[tuple[str, str], list[float]]):
        self.ensemble, self.how, self.name, self.cache = ensemble, how, how, cache

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        keys = [(str(p), str(c)) for p, c in zip(prompts, completions, strict=True)]
        new = [i for i, key in enumerate(keys) if key not in self.cache]
        fresh = self.ensemble.columns([prompts[i] for i in new], [completions[i] for i in new]) if new else []
        self.cache.update({keys[i]: row for i, row in zip(new, fresh, strict=True)})
        rows = [self.cache[key] for key in keys]
        if self.how == "member 0":
            return [row[0] for row in rows]
        return aggregate_rows(rows, self.how, UNCERTAINTY_PENALTY).rewards


def _run(lab: Lab) -> dict[str, Any]:
    sizes = QUICK if lab.quick else FULL
    task = SentimentTask()
    lab.say("1/5 SFT: the starting policy writes reviews")
    start = lab.sft(task, sizes.sft_steps)

    lab.say(f"2/5 an ensemble of {sizes.members} proxy reward models on {sizes.rm_pairs} Bradley–Terry pairs")
    ensemble, proxy_accuracy = proxies(lab, task, start, sizes)
    cache: dict[tuple[str, str], list[float]] = {}
    rewards = {label: Optimized(ensemble, how, cache) for label, how in REWARDS.items()}
    prompts = [task.prompt(random.Random(1000 * lab.seed + 3 + i).choice(TOPICS)) for i in range(512)]

    lab.say(f"3/5 best-of-n from {sizes.pool} samples of the starting policy per prompt")
    pool = sample_pool(lab, start, sizes.pool)
    curves = {f"best-of-n|{label}": best_of_n_curve(pool, reward, sizes) for label, reward in rewards.items()}
    lab.say(f"4/5 online DPO, {sizes.online_rounds} rounds, against each reward")
    for label, reward in rewards.items():
        curves[f"online DPO|{label}"] = online_curve(lab, start, reward, prompts, sizes)
    lab.say(f"5/5 PPO, {sizes.ppo_steps} steps at β = {PPO['ppo.kl_coef']}, against each reward")
    for label, reward in rewards.items():
        # Its first point is the starting policy's, as best-of-1 measures it (KL 0).
        first = {**curves[f"best-of-n|{label}"][0], "at": "start"}
        curves[f"PPO|{label}"] = [first, *ppo_curve(lab, start, reward, prompts, sizes)]
    return write_up(lab, {"sizes": asdict(sizes), "proxy_accuracy": proxy_accuracy}, curves)


def proxies(
    lab: Lab, task: SentimentTask, start: nn.Module, sizes: Sizes
) -> tuple[EnsembleScorer, dict[str, Any]]:
    """The ensemble (``rm train --ensemble K``, from the starting policy's backbone with new heads,
    each member on every pair with its own seed) and its held-out accuracy per member and aggregate."""
    pairs, _ = task.bradley_terry_pairs(sizes.rm_pairs, 1000 * lab.seed + 1)
    held_out, bayes = task.bradley_terry_pairs(500 if not lab.quick else 16, 1000 * lab.seed + 2)
    model = tiny_reward_model(len(lab.tokenizer), seed=lab.seed)
    backbone = {k: v for k, v in start.state_dict().items() if k.startswith("model.")}
    model.load_state_dict(backbone, strict=False)
    settings = {
        "rm.ensemble": sizes.members,
        "rm.bootstrap": False,
        "train.learning_rate": 3e-3,
        "train.epochs": 2,
        "train.warmup_steps": 5,
    }
    result = lab.train("proxies", train_reward_model, model, pairs, settings, eval_records=held_out)
    summary = {k: v for k, v in result.history[-1].items() if k.startswith("eval_")}
    ensemble = EnsembleScorer(str(result.final_dir), batch_size=64, device="cpu")
    return ensemble, {"bayes": bayes, "pairs": len(pairs), **summary}


def sample_pool(lab: Lab, start: nn.Module, size: int) -> tuple[list[str], list[list[str]]]:
    """``size`` samples of the starting policy for each task prompt (one per topic)."""
    prompts = [SentimentTask.prompt(t) for t in TOPICS]
    ids = [lab.tokenizer(p)["input_ids"] for p in prompts for _ in range(size)]
    stop = eos_ids(start, lab.tokenizer)
    samples = generate(start, ids, lab.tokenizer.pad_token_id, stop, MAX_NEW_TOKENS, 1000 * lab.seed + 13)
    texts = lab.tokenizer.batch_decode(samples, skip_special_tokens=True)
    return prompts, [texts[i * size : (i + 1) * size] for i in range(len(prompts))]


def best_of_n_curve(
    pool: tuple[list[str], list[list[str]]], reward: Optimized, sizes: Sizes
) -> list[dict[str, Any]]:
    """Best-of-n by ``reward`` from the pool, n = 1, 2, 4, … up to its size: the expected reward
    optimized and true reward of the sample chosen, at the analytic KL."""
    ns = [2**i for i in range(int(math.log2(sizes.pool)) + 1)]
    points = best_of_n(reward, pool[0], pool[1], ns, measure=TrueReward())
    return [{"at": f"n={p['n']}", "kl": p["kl"], "proxy": p["reward"], "true": p["measured"]} for p in points]


def online_curve(
    lab: Lab, start: nn.Module, reward: Optimized, prompts: list[str], sizes: Sizes
) -> list[dict[str, Any]]:
    """Online DPO against ``reward``, watched by the true reward: a point per round and the final policy."""
    run = f"online-{_slug(reward.how)}"
    settings = {
        **ONLINE,
        "train.max_steps": sizes.online_steps,
        "online.rounds": sizes.online_rounds,
        "online.samples_per_prompt": 4,
        "online.prompts_per_round": sizes.online_prompts,
        "rollout.max_new_tokens": MAX_NEW_TOKENS,
        "rollout.batch_size": 64,
    }
    result = quietly(lab, run, train_online, lab.config(run, settings), model=copy.deepcopy(start),
                     prompts=[{"prompt": p} for p in prompts], scorer=reward, monitor=TrueReward())  # fmt: skip
    rows = [*result.rounds, *([result.final] if result.final else [])]
    return [
        {
            "at": f"round {r['round']}",
            "kl": r["kl_to_initial"],
            "proxy": r["reward_mean"],
            "true": r["monitor_mean"],
        }
        for r in rows
    ]


def ppo_curve(
    lab: Lab, start: nn.Module, reward: Optimized, prompts: list[str], sizes: Sizes
) -> list[dict[str, Any]]:
    """PPO against ``reward``, watched by the true reward: a point per logged row (the mean of its steps)."""
    run = f"ppo-{_slug(reward.how)}"
    settings = {
        **PPO,
        "ppo.steps": sizes.ppo_steps,
        "ppo.rollouts_per_step": sizes.ppo_rollouts,
        "ppo.num_mini_batches": 2 if sizes.ppo_rollouts >= 16 else 1,
        "rollout.max_new_tokens": MAX_NEW_TOKENS,
        "train.log_every": sizes.ppo_log_every,
        "train.save_every": None,
    }
    result = quietly(lab, run, train_ppo, lab.config(run, settings), model=copy.deepcopy(start),
                     prompts=[{"prompt": p} for p in prompts], scorer=reward, monitor=TrueReward())  # fmt: skip
    points = []
    for row in result.history:
        if "objective/monitor_scores" in row:
            kl = max(row["objective/kl"], 0.0)  # k1 is unbiased but can dip below 0 at the start
            points.append({"at": f"step {row['step']}", "kl": kl, "proxy": row["objective/scores"],
                           "true": row["objective/monitor_scores"]})  # fmt: skip
    return points


def quietly(lab: Lab, run: str, fit: Callable[..., Any], config: Any, **kwargs: Any) -> Any:
    """``fit(config, tokenizer=lab.tokenizer, **kwargs)`` with its console output in ``runs/<run>.log``."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = fit(config, tokenizer=lab.tokenizer, **kwargs)
    path = lab.output / "runs" / f"{run}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log.getvalue(), encoding="utf-8")
    return result


def _slug(how: str) -> str:
    return how.replace(" ", "").replace("_", "-")
