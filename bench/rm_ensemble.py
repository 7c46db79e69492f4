"""Reward-model ensembles, kind against kind: accuracy, disagreement, best-of-n, time and memory.

    python bench/rm_ensemble.py --sizes tiny             # K = 4, every kind, on the task's tiny Llama
    python bench/rm_ensemble.py --sizes 25m --kinds single full heads lora   # time and memory at 25M

For each size and kind (``single``: one reward model, the baseline; ``full``, ``heads``, ``lora``:
``rm train --ensemble K`` with that ``rm.ensemble_kind``, members differing in seed only;
``…/bootstrap``: each member also on its bootstrap resample, ``rm.bootstrap=true``), two
processes, so that peak memory is the kind's own:

1. **train**: from the same starting reward model (``tiny``: the synthetic task's SFT'd tiny Llama
   with a new head, as the experiments build their reward models; ``25m``: a randomly initialised
   Llama of 25M parameters, for time and memory), on the same Bradley–Terry pairs, one thread:
   seconds (wall-clock and the process's CPU time: on a shared machine the CPU seconds are the
   steadier figure) and peak resident memory over the process's baseline (torch and the data loaded);
2. **score**: load ``final/`` through the scorer interface, score the held-out pairs and a pool of
   the SFT policy's samples: seconds (wall, CPU) per 1,000 completions, peak resident memory over the baseline,
   the parameters held; each member's held-out accuracy and each aggregate's (``mean``, ``min``,
   ``mean_minus_std`` with λ = 1) against the Bayes ceiling; the members' disagreement on the
   held-out texts and on the policy's samples; and best-of-n from the pool, selected by member 0
   alone and by each aggregate, measured by the task's true reward.

Results go to ``bench/results/rm-ensemble-<size>.json`` and a table on the console.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine, peak_mib, rss_mib

SIZES = {"tiny": (64, 2, 4), "25m": (512, 8, 8)}  # hidden, layers, heads (vocabulary: the task's 512)
PAIRS, HELD_OUT, POOL, PROMPTS, NS = 512, 1000, 128, 12, (1, 4, 16, 64, 128)
STEPS = {"tiny": None, "25m": 16}  # tiny: 2 epochs; 25m: 16 steps (time and memory only)


def prepare(work: Path) -> None:
    """The SFT policy (the tiny reward models' backbone), the pairs and the pool, once."""
    from preftune.experiments.common import Lab, one_thread
    from preftune.experiments.synthetic import TOPICS, SentimentTask
    from preftune.generation.rollout import eos_ids
    from preftune.generation.sampling import generate

    task = SentimentTask()
    with one_thread():
        lab = Lab(work / "lab", seed=0, quick=False)
        policy = lab.sft(task, 80)
        policy.save_pretrained(work / "sft")
        lab.tokenizer.save_pretrained(work / "sft")
        prompts = [task.prompt(t) for t in TOPICS]
        ids = [lab.tokenizer(p)["input_ids"] for p in prompts for _ in range(POOL)]
        stop = eos_ids(policy, lab.tokenizer)
        samples = generate(policy, ids, lab.tokenizer.pad_token_id, stop, 16, seed=5)
    texts = lab.tokenizer.batch_decode(samples, skip_special_tokens=True)
    pool = [{"prompt": p, "completions": texts[i * POOL : (i + 1) * POOL]} for i, p in enumerate(prompts)]
    train, _ = task.bradley_terry_pairs(PAIRS, 1)
    held_out, bayes = task.bradley_terry_pairs(HELD_OUT, 2)
    (work / "data.json").write_text(
        json.dumps({"train": train, "held_out": held_out, "bayes": bayes, "pool": pool})
    )


def starting_model(work: Path, size: str) -> torch.nn.Module:
    from preftune.experiments.synthetic import tiny_reward_model

    hidden, layers, heads = SIZES[size]
    model = tiny_reward_model(512, hidden, layers, heads, seed=0)
    if size == "tiny":  # the SFT policy's backbone, a new head
        from transformers import AutoModelForCausalLM

        sft = AutoModelForCausalLM.from_pretrained(work / "sft")
        model.load_state_dict(
            {k: v for k, v in sft.state_dict().items() if k.startswith("model.")}, strict=False
        )
    return model


def train_child(work: Path, size: str, kind: str, k: int, seed: int) -> dict[str, object]:
    from transformers import AutoTokenizer

    from preftune.config import load_config
    from preftune.experiments.common import one_thread
    from preftune.recipes.reward import train_reward_model

    data = json.loads((work / "data.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(work / "sft")
    model = starting_model(work, size)
    settings = {
        "train.output_dir": str(work / f"{size}-{kind.replace('/', '-')}"), "train.overwrite": True, "train.progress": False,
        "train.report_to": ["none"], "train.mixed_precision": "no", "train.batch_size": 32,
        "train.learning_rate": 3e-3, "train.warmup_steps": 5, "train.save_every": None, "train.log_every": 1000,
        "train.epochs": 2, "train.max_steps": STEPS[size], "rm.ensemble": 1 if kind == "single" else k,
        "rm.ensemble_kind": "full" if kind == "single" else kind.split("/")[0],
        "rm.bootstrap": kind.endswith("/bootstrap"), "train.seed": 100 * seed,
    }  # fmt: skip
    config = load_config(base=settings)
    baseline = rss_mib()
    started, cpu = time.perf_counter(), time.process_time()
    with one_thread():
        result = train_reward_model(config, model=model, tokenizer=tokenizer, train_data=data["train"])
    return {
        "train_seconds": time.perf_counter() - started,
        "train_cpu_seconds": time.process_time() - cpu,
        "train_extra_peak_mib": peak_mib() - baseline,
        "steps": result.steps,
        "final": str(result.final_dir),
    }


def score_child(work: Path, size: str, kind: str) -> dict[str, object]:
    from preftune.evaluation.samples import best_of_n
    from preftune.experiments.synthetic import true_reward
    from preftune.generation.aggregate import AGGREGATES, aggregate_rows
    from preftune.generation.rewards import load_scorer

    data = json.loads((work / "data.json").read_text())
    final = str(work / f"{size}-{kind.replace('/', '-')}" / "final")
    baseline = rss_mib()
    torch.set_num_threads(1)
    scorer = load_scorer(final, batch_size=64, device="cpu")
    held = data["held_out"]
    prompts = [r["prompt"] for r in held] * 2
    completions = [r["chosen"] for r in held] + [r["rejected"] for r in held]
    started, cpu = time.perf_counter(), time.process_time()
    columns = (
        scorer.columns(prompts, completions)
        if hasattr(scorer, "columns")
        else [[s] for s in scorer(prompts, completions)]
    )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    out: dict[str, object] = {
        "score_seconds_per_1000": 1000 * seconds / len(completions),
        "score_cpu_seconds_per_1000": 1000 * cpu / len(completions),
        "score_extra_peak_mib": peak_mib() - baseline,
        "parameters_loaded": _parameters(scorer),
        "bayes": data["bayes"],
    }
    chosen, rejected = columns[: len(held)], columns[len(held) :]
    out["member_accuracy"] = [
        sum(c[k] > r[k] for c, r in zip(chosen, rejected, strict=True)) / len(held)
        for k in range(len(columns[0]))
    ]
    for how in AGGREGATES:
        a, b = aggregate_rows(chosen, how).rewards, aggregate_rows(rejected, how).rewards
        out[f"accuracy_{how}"] = sum(x > y for x, y in zip(a, b, strict=True)) / len(held)
    out["disagreement_held_out"] = aggregate_rows(columns, "mean").disagreement()
    pool_prompts = [p["prompt"] for p in data["pool"]]
    pools = [p["completions"] for p in data["pool"]]
    flat_prompts = [p for p, pool in zip(pool_prompts, pools, strict=True) for _ in pool]
    flat = [c for pool in pools for c in pool]
    pool_columns = (
        scorer.columns(flat_prompts, flat)
        if hasattr(scorer, "columns")
        else [[s] for s in scorer(flat_prompts, flat)]
    )
    out["disagreement_policy_samples"] = aggregate_rows(pool_columns, "mean").disagreement()

    class Fixed:  # the pool's scores, computed once, served by an aggregate or one member
        def __init__(self, rows, how):
            self.name, self.rows, self.how = how, rows, how

        def __call__(self, p, c):
            if self.how == "member 0":
                return [row[0] for row in self.rows]
            return aggregate_rows(self.rows, self.how).rewards

    truth = lambda p, c: true_reward(list(p), list(c))  # noqa: E731
    for how in ("member 0", *AGGREGATES):
        points = best_of_n(Fixed(pool_columns, how), pool_prompts, pools, NS, measure=truth)
        out[f"best_of_n_true_reward/{how}"] = {p["n"]: p["measured"] for p in points}
    return out


def _parameters(scorer: object) -> int:
    """Parameters the loaded scorer holds: every member's model, or one base and its adapters."""
    models = getattr(scorer, "models", None) or [scorer.model]
    return sum(p.numel() for p in {id(p): p for m in models for p in m.parameters()}.values())


def run(args: argparse.Namespace, *extra: str) -> dict[str, object]:
    command = [sys.executable, __file__, *extra, "--work", str(args.work), "--members", str(args.members)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(rows: list[dict[str, object]]) -> dict[str, object]:
    """Means over the seeds of every number (best-of-n: per n); member accuracy: its mean and range."""
    out: dict[str, object] = {}
    for key, value in rows[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = sum(float(r[key]) for r in rows) / len(rows)  # type: ignore[arg-type]
        elif isinstance(value, dict):
            out[key] = {n: sum(r[key][n] for r in rows) / len(rows) for n in value}  # type: ignore[index]
    members = [a for r in rows for a in r["member_accuracy"]]  # type: ignore[attr-defined]
    out["member_accuracy"] = {"mean": sum(members) / len(members), "min": min(members), "max": max(members)}
    return out


def show(size: str, kinds: dict[str, dict[str, object]]) -> None:
    print(f"\n{size}: means over seeds (seconds: CPU)")
    print(f"{'kind':16}{'train s':>8}{'MiB':>6}{'score s/1k':>11}{'MiB':>6}{'params':>11}  member acc      "
          f"{'mean':>6}{'min':>6}{'m−std':>6}{'std':>6}   best-of-128 true reward: member 0 / mean / min / m−std")  # fmt: skip
    for kind, row in kinds.items():
        s, m = row["summary"], row["summary"]["member_accuracy"]  # type: ignore[index]
        bon = [s[f"best_of_n_true_reward/{h}"]["128"] for h in ("member 0", "mean", "min", "mean_minus_std")]  # type: ignore[index]
        dis = s.get("disagreement_held_out")  # type: ignore[union-attr]
        print(f"{kind:16}{s['train_cpu_seconds']:8.1f}{s['train_extra_peak_mib']:6.0f}{s['score_cpu_seconds_per_1000']:11.2f}"
              f"{s['score_extra_peak_mib']:6.0f}{s['parameters_loaded']:11.0f}  {100 * m['mean']:.1f} [{100 * m['min']:.1f}, "
              f"{100 * m['max']:.1f}] {100 * s['accuracy_mean']:6.1f}{100 * s['accuracy_min']:6.1f}"
              f"{100 * s['accuracy_mean_minus_std']:6.1f}{dis if dis is None else f'{dis:6.2f}'!s:>6}   "
              + " / ".join(f"{b:+.3f}" for b in bon))  # type: ignore[index, str-format]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--kinds", nargs="+", default=["single", "full", "full/bootstrap", "heads", "heads/bootstrap", "lora"]
    )
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="train.seed 0 … N−1 (heads, order, resamples)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/preftune-rm-ensemble"))
    parser.add_argument("--child", choices=["train", "score"])
    parser.add_argument("--size")
    parser.add_argument("--kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child == "train":
        print(json.dumps(train_child(args.work, args.size, args.kind, args.members, args.seed)))
        return
    if args.child == "score":
        print(json.dumps(score_child(args.work, args.size, args.kind)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "data.json").exists():
        prepare(args.work)
    for size in args.sizes:
        results: dict[str, object] = {
            "machine": machine(),
            "members": args.members,
            "pairs": PAIRS,
            "kinds": {},
        }
        for kind in args.kinds:
            rows = []
            for seed in range(args.seeds):
                row = run(args, "--child", "train", "--size", size, "--kind", kind, "--seed", str(seed))
                row |= run(args, "--child", "score", "--size", size, "--kind", kind)
                rows.append(row)
                print(f"{size} {kind} seed {seed}: train {row['train_cpu_seconds']:.1f} s CPU", flush=True)
            results["kinds"][kind] = {"seeds": rows, "summary": summary(rows)}  # type: ignore[index]
        results["load_average_after"] = machine()["load_average_1m"]
        path = Path(__file__).parent / "results" / f"rm-ensemble-{size}.json"
        path.write_text(json.dumps(results, indent=2))
        show(size, results["kinds"])  # type: ignore[arg-type]
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
