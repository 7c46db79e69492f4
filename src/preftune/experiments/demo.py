"""``preftune demo``: a real end-to-end run with no network and a measurable result.

1. Build a tokenizer and a tiny Llama locally.
2. SFT warm start on random reviews (``review of the park: calm dull bright …``), so the
   policy writes positive and negative words alike.
3. Sample two reviews per prompt from the SFT policy and label each pair with the task's
   true reward (#positive − #negative words, per word): on-policy preference pairs.
4. DPO, then DPOP, each from the SFT policy (the reference) on those pairs — the same
   training loop and objective registry as ``preftune train``.
5. On held-out prompts, sample from every policy and report the true-reward win rate over
   SFT, the implicit reward's accuracy, how often average log-prob ranks chosen first, and
   how the chosen and rejected log-likelihoods moved; save the training curves as a PNG.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig, load_config
from ..data import TokenizedPair, prepare_pairs
from ..data.layouts import collate_pairs
from ..engine import TrainResult
from ..evaluation.metrics import drift, ranking
from ..generation.sampling import sample
from ..model.logps import sequence_logps
from ..recipes.dpo import pair_stats, train
from .synthetic import SentimentTask, build_tokenizer, tiny_llama

BETA = 0.1
DPOP_LAMBDA = 1.0  # the paper uses 50 with β = 0.3 on 7B models; a tiny model needs a lighter hand


def preference_pairs(
    model: nn.Module, tokenizer: Any, task: SentimentTask, prompts: list[str], seed: int
) -> list[dict]:
    """Two on-policy samples per prompt, ordered by the true reward; ties are skipped."""
    first = sample(model, tokenizer, prompts, seed)
    second = sample(model, tokenizer, prompts, seed + 1)
    records = []
    for prompt, a, b in zip(prompts, first, second, strict=True):
        ra, rb = task.true_reward(a), task.true_reward(b)
        if ra == rb or not a.strip() or not b.strip():
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def win_rate(task: SentimentTask, new: list[str], old: list[str]) -> float:
    """P(true reward of new > old) + ½ P(tie)."""
    wins = sum(
        (task.true_reward(a) > task.true_reward(b)) + 0.5 * (task.true_reward(a) == task.true_reward(b))
        for a, b in zip(new, old, strict=True)
    )
    return wins / len(new)


@torch.no_grad()
def implicit_rewards(
    policy: nn.Module, reference: nn.Module, pairs: list[TokenizedPair], pad_id: int, beta: float
) -> dict[str, float]:
    """The failure-mode metrics of :mod:`preftune.evaluation.metrics` on held-out pairs: DPO's implicit
    reward ``β log π/π_ref``, the chosen and rejected likelihood drift, average-log-prob ranking."""
    device = next(policy.parameters()).device
    reference.to(device)
    batch = collate_pairs(pairs, pad_id).to(device)
    stats = pair_stats(
        sequence_logps(policy.eval(), batch), sequence_logps(reference.eval(), batch).logps, batch
    )
    values = {name: value.mean().item() for name, value in {**drift(stats), **ranking(stats)}.items()}
    return {
        "accuracy": values["implicit/accuracy"],
        "margin": beta * (values["drift/chosen"] - values["drift/rejected"]),
        "chosen_logp_drift": values["drift/chosen"],
        "rejected_logp_drift": values["drift/rejected"],
        "avg_logp_ranks_chosen_first": values["ranking/policy"],
    }


def plot_curves(runs: dict[str, Path], png: Path) -> bool:
    """Loss, reward accuracy, margin and log-probs of each run's ``metrics.jsonl``, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [
        ("loss", "loss"),
        ("rewards/accuracies", "reward accuracy"),
        ("rewards/margins", "reward margin"),
        ("logps/chosen", "log p(chosen) (solid), log p(rejected) (dashed)"),
    ]
    for (name, metrics_file), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=False):
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"loss"' in line]
        steps = [r["step"] for r in rows]
        for ax, (key, title) in zip(axes, panels, strict=True):
            ax.plot(steps, [r[key] for r in rows], color=color, label=name.upper())
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[3].plot(steps, [r["logps/rejected"] for r in rows], color=color, linestyle="--")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def run_demo(output_dir: str = "demo-output", quick: bool = False, seed: int = 0) -> dict[str, float]:
    started = time.perf_counter()
    out = Path(output_dir)
    task = SentimentTask()
    tokenizer = build_tokenizer(vocab_size=512)
    model = tiny_llama(len(tokenizer), hidden_size=64, layers=2, heads=4, seed=seed)

    print("1/5 SFT warm start on random reviews")
    sft_model = sft_warm_start(model, tokenizer, task, out / "sft", quick, seed)

    print("2/5 sampling on-policy pairs, labelled by the true reward")
    n_prompts = 256 if quick else 1024
    train_records = preference_pairs(model, tokenizer, task, task.prompts(n_prompts, seed + 1), seed + 2)
    held_out_prompts = task.prompts(256, seed + 100)
    held_out_records = preference_pairs(sft_model, tokenizer, task, held_out_prompts, seed + 3)
    print(f"    {len(train_records)} training pairs, {len(held_out_records)} held-out pairs")
    for name, records in (("pairs.jsonl", train_records), ("heldout_pairs.jsonl", held_out_records)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    eval_prompts = held_out_prompts * 4
    sft_samples = sample(sft_model, tokenizer, eval_prompts, seed + 7)
    report: dict[str, float] = {"true_reward_sft": _mean(map(task.true_reward, sft_samples))}
    columns: dict[str, dict[str, float]] = {}
    for step, name in ((3, "dpo"), (4, "dpop")):
        print(f"{step}/5 {name.upper()} from the SFT policy")
        policy = tiny_llama(len(tokenizer), hidden_size=64, layers=2, heads=4)
        policy.load_state_dict(sft_model.state_dict())
        result, cfg = train_from_sft(policy, name, tokenizer, train_records, out / name, quick, seed)
        samples = sample(policy, tokenizer, eval_prompts, seed + 7)
        held_out_pairs, _ = prepare_pairs(held_out_records, tokenizer, cfg.data, progress=False)
        implicit = implicit_rewards(policy, sft_model, list(held_out_pairs), tokenizer.pad_token_id, BETA)
        columns[name] = {
            "win_rate_vs_sft": win_rate(task, samples, sft_samples),
            "true_reward": _mean(map(task.true_reward, samples)),
            "train_reward_accuracy": result.history[-1]["rewards/accuracies"],
            "train_reward_margin": result.history[-1]["rewards/margins"],
            **{f"heldout_{key}": value for key, value in implicit.items()},
        }
        report.update({f"{key}_{name}": value for key, value in columns[name].items()})

    print("5/5 evaluated on held-out prompts")
    # Names kept short for scripts: the DPO policy's win rate is the headline figure.
    report["win_rate_dpo_vs_sft"] = columns["dpo"]["win_rate_vs_sft"]
    report["seconds"] = time.perf_counter() - started
    print_table(report["true_reward_sft"], columns)
    png = out / "training_curves.png"
    if plot_curves({m: out / m / "metrics.jsonl" for m in ("dpo", "dpop")}, png):
        print(f"training curves: {png}")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'report.json'}  ({report['seconds']:.0f} s)")
    return report


def sft_warm_start(
    model: nn.Module, tokenizer: Any, task: SentimentTask, output_dir: Path, quick: bool, seed: int
) -> nn.Module:
    """``model`` trained to write random reviews (with ``objective.loss=sft``: the chosen ones);
    returns a copy of it, the SFT policy every later policy starts from and is measured against."""
    rng = random.Random(seed)
    sft_records = [
        {"prompt": p, "chosen": task.random_response(rng), "rejected": task.random_response(rng)}
        for p in task.prompts(2048, seed)
    ]
    sft_cfg = load_config(
        base={
            "objective.loss": ["sft"],
            "train.output_dir": str(output_dir),
            "train.learning_rate": 3e-3,
            "train.batch_size": 32,
            "train.max_steps": 60 if quick else 150,
            "train.warmup_steps": 10,
            "train.log_every": 25,
            "train.seed": seed,
            "data.max_length": 64,
            "data.identical_pairs": "drop",
        }
    )
    train(sft_cfg, model=model, tokenizer=tokenizer, train_data=sft_records)
    sft_model = tiny_llama(len(tokenizer), hidden_size=64, layers=2, heads=4)
    sft_model.load_state_dict(model.state_dict())
    return sft_model


def train_from_sft(
    policy: nn.Module,
    objective: str,
    tokenizer: Any,
    records: list[dict],
    output_dir: Path,
    quick: bool,
    seed: int,
) -> tuple[TrainResult, RunConfig]:
    """``policy`` (a copy of the SFT policy) trained with ``objective`` (``dpo`` or ``dpop``) on the
    on-policy pairs; returns the run's result and its config."""
    cfg = load_config(
        base={
            "objective.loss": [objective],
            "objective.beta": BETA,
            **({"objective.dpop_lambda": DPOP_LAMBDA} if objective == "dpop" else {}),
            "train.output_dir": str(output_dir),
            "train.learning_rate": 2e-3,
            "train.batch_size": 32,
            "train.epochs": 2 if quick else 3,
            "train.warmup_steps": 5,
            "train.log_every": 5,
            "train.seed": seed,
            "data.max_length": 64,
        }
    )
    return train(cfg, model=policy, tokenizer=tokenizer, train_data=records), cfg


def print_table(true_reward_sft: float, columns: dict[str, dict[str, float]]) -> None:
    """The figures of SFT (where it has them), DPO and DPOP side by side, then what DPO did to
    log p(chosen)."""
    rows = [
        ("true reward, held-out samples", "true_reward", "{:.3f}", f"{true_reward_sft:.3f}"),
        ("win rate vs SFT (true reward)", "win_rate_vs_sft", "{:.1%}", "50.0%"),
        ("train reward accuracy (last)", "train_reward_accuracy", "{:.1%}", "—"),
        ("train reward margin (last)", "train_reward_margin", "{:.3f}", "0.000"),
        ("held-out implicit-reward accuracy", "heldout_accuracy", "{:.1%}", "—"),
        ("held-out avg-logp ranks chosen 1st", "heldout_avg_logp_ranks_chosen_first", "{:.1%}", "—"),
        ("held-out log p(chosen) − ref", "heldout_chosen_logp_drift", "{:+.2f}", "0.00"),
        ("held-out log p(rejected) − ref", "heldout_rejected_logp_drift", "{:+.2f}", "0.00"),
    ]
    print()
    print(f"{'':36}{'SFT (start)':>12}{'DPO':>12}{'DPOP':>12}")
    for label, key, fmt, start in rows:
        print(
            f"{label:36}{start:>12}" + "".join(f"{fmt.format(columns[m][key]):>12}" for m in ("dpo", "dpop"))
        )
    print()
    dpo_drift, dpop_drift = (columns[m]["heldout_chosen_logp_drift"] for m in ("dpo", "dpop"))
    if dpo_drift < 0:
        print(
            f"DPO lowered log p(chosen) by {-dpo_drift:.2f} nats on held-out pairs: both likelihoods fell, the"
        )
        print(
            f"rejected one faster (a known DPO failure mode). DPOP (λ={DPOP_LAMBDA:g}) moved it by {dpop_drift:+.2f}."
        )


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)
