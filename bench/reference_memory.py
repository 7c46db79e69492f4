"""What each reference strategy costs and what it changes: the same SFT model, the same pairs, N DPO
steps per strategy, each in its own process (so peak memory is per strategy).

Strategies (``reference.*``; the policy trains all its weights unless said otherwise):

* ``copy``        a frozen fp32 copy of the starting policy (4 bytes a weight)
* ``int8``        the same copy in int8 (``reference.quantize=int8``, LLM.int8())
* ``nf4``         the same copy in NF4 (``reference.quantize=nf4``, double quantization)
* ``precomputed`` one pass before training, a table of four floats per pair
* ``adapter``     LoRA on the fp32 policy, the reference its adapters off (trains LoRA, not all weights)
* ``qlora``       LoRA on an NF4 base, the reference its adapters off (``model.load_in_4bit``)

Figures per strategy: peak resident memory of the process, the reference's own bytes, median seconds
per step (and the setup before the first step: loading, copying, quantizing or precomputing), the
error the reference puts into the held-out log-probs against the fp32 reference, and after training
the held-out implicit-reward accuracy (β log π/π_ref measured against the *fp32* reference for every
strategy, so they are comparable; and as the run itself logged it, against its own reference) and the
true reward of samples from the final policy (the task's known reward; the SFT start is the baseline).

    python bench/reference_memory.py                    # 13M-parameter Llama, 40 steps, ~15 min on 2 cores
    python bench/reference_memory.py --quick            # tiny model, a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine, reset_peak, rss_mib, window_peak_mib

SIDES: dict[str, dict[str, Any]] = {
    "copy": {"reference.strategy": "copy"},
    "int8": {"reference.strategy": "copy", "reference.quantize": "int8"},
    "nf4": {"reference.strategy": "copy", "reference.quantize": "nf4"},
    "precomputed": {"reference.strategy": "precomputed"},
    "adapter": {"model.lora": True, "model.lora_r": 16},
    "qlora": {"model.load_in_4bit": True, "model.lora_r": 16},
}
LORA_LR_SCALE = 10  # LoRA trains a few weights: it takes a larger step (docs: ~1e-5 vs ~1e-6 at scale)
BETA = 0.1
CHILD_ARGS = ("hidden", "layers", "steps", "batch_size", "lr", "threads", "work")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="DPO steps per strategy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="full-weight learning rate")
    parser.add_argument("--sft-steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--work", default="bench-output/reference_memory")
    parser.add_argument("--out", default="bench/results/reference_memory.json")
    parser.add_argument("--quick", action="store_true", help="hidden 64, 2 layers, 8 steps: a smoke test")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one strategy, print its JSON
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.steps, args.sft_steps, args.batch_size = 64, 2, 8, 30, 8
    return args


# --------------------------------------------------------------------------- the shared model and data


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """An SFT model that writes the task's reviews, on-policy training pairs and held-out pairs
    labelled by the true reward (the demo's recipe, at this model size)."""
    import torch

    from preftune.config import load_config
    from preftune.experiments.demo import preference_pairs
    from preftune.experiments.synthetic import SentimentTask, build_tokenizer, tiny_llama
    from preftune.generation.sampling import sample
    from preftune.recipes.dpo import train

    torch.set_num_threads(args.threads)
    task, tokenizer = SentimentTask(), build_tokenizer(vocab_size=512)
    model = tiny_llama(len(tokenizer), hidden_size=args.hidden, layers=args.layers, heads=4, seed=0)
    rng = random.Random(0)
    sft_records = [
        {"prompt": p, "chosen": task.random_response(rng), "rejected": task.random_response(rng)}
        for p in task.prompts(args.sft_steps * 32, 0)
    ]
    settings = {
        "objective.loss": ["sft"],
        "train.output_dir": str(work / "sft-run"),
        "train.learning_rate": 3e-3 if args.hidden <= 128 else 1e-3,
        "train.batch_size": 32,
        "train.max_steps": args.sft_steps,
        "train.warmup_steps": 10,
        "train.progress": False,
        "train.report_to": ["none"],
        "train.mixed_precision": "no",
        "train.save_every": None,
        "train.overwrite": True,
        "data.max_length": 64,
        "data.identical_pairs": "drop",
    }
    train(load_config(base=settings), model=model, tokenizer=tokenizer, train_data=sft_records)
    model.save_pretrained(work / "sft")
    tokenizer.save_pretrained(work / "sft")
    pairs = preference_pairs(model, tokenizer, task, task.prompts(args.steps * args.batch_size, 1), 2)
    heldout_prompts = task.prompts(256, 100)
    heldout = preference_pairs(model, tokenizer, task, heldout_prompts, 3)
    for name, records in (("pairs.jsonl", pairs), ("heldout.jsonl", heldout)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (work / "prompts.json").write_text(json.dumps(heldout_prompts))
    samples = sample(model, tokenizer, heldout_prompts * 2, 7)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_pairs": len(pairs),
        "heldout_pairs": len(heldout),
        "sft_true_reward": statistics.fmean(map(task.true_reward, samples)),
    }


# --------------------------------------------------------------------------- one strategy


def run_side(args: argparse.Namespace, work: Path, name: str) -> dict[str, Any]:
    """Train with strategy ``name`` and measure it; in a process of its own."""
    import torch

    from preftune.config import load_config
    from preftune.recipes.dpo import train

    torch.set_num_threads(args.threads)
    lora = "model.lora" in SIDES[name] or "model.load_in_4bit" in SIDES[name]
    settings = {
        "model.name_or_path": str(work / "sft"),
        "data.path": str(work / "pairs.jsonl"),
        "data.max_length": 64,
        "objective.loss": ["sigmoid"],
        "objective.beta": BETA,
        "train.output_dir": str(work / "runs" / name),
        "train.learning_rate": args.lr * (LORA_LR_SCALE if lora else 1),
        "train.batch_size": args.batch_size,
        "train.max_steps": args.steps,
        "train.log_every": max(1, args.steps // 8),
        "train.progress": False,
        "train.report_to": ["none"],
        "train.mixed_precision": "no",
        "train.save_every": None,
        "train.overwrite": True,
        "train.seed": 0,
        **SIDES[name],
    }
    config = load_config(base=settings)
    before = rss_mib()  # imports done: what the strategy adds shows above this
    assert reset_peak(), "needs Linux's /proc/self/clear_refs to measure the run's own peak"
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    peak = window_peak_mib()  # the run's own peak, read before anything below loads more
    windows = [args.batch_size / h["pairs_per_second"] for h in result.history[1:] if "pairs_per_second" in h]
    step = statistics.median(windows) if windows else float("nan")
    row = {
        "strategy": name,
        "peak_mib": round(peak, 1),
        "peak_over_start_mib": round(peak - before, 1),  # the run's own memory: models, states, activations
        "step_s": round(step, 4),
        "setup_s": round(wall - step * args.steps, 2),
        "train_accuracy_last": result.history[-1]["rewards/accuracies"],
    }
    return row | measure(args, work, name, config, result.final_dir)


def reference_model(name: str, sft: Any) -> tuple[Any, bool]:
    """The model the strategy's reference runs, built as the run built it (None: the policy itself,
    or a table), and whether it is a second model in memory."""
    import torch

    from preftune.model.quantize import quantized

    if name in ("int8", "nf4"):
        return quantized(sft, name, torch.float32, torch.device("cpu")), True
    if name == "qlora":  # adapters off: the NF4 base the policy trains on, no second model
        return quantized(sft, "nf4", torch.float32, torch.device("cpu")), False
    return (sft, True) if name == "copy" else (None, False)


def measure(args: argparse.Namespace, work: Path, name: str, config: Any, final: Path) -> dict[str, Any]:
    """The reference's bytes and log-prob error, and the trained policy's held-out accuracy (against
    the fp32 reference) and true reward."""
    import torch
    from transformers import AutoModelForCausalLM

    from preftune.data import prepare_pairs
    from preftune.experiments.demo import implicit_rewards
    from preftune.experiments.synthetic import SentimentTask
    from preftune.generation.sampling import sample
    from preftune.model.load import load_tokenizer
    from preftune.model.set_logps import pair_logps

    tokenizer = load_tokenizer(config.model)
    sft = AutoModelForCausalLM.from_pretrained(work / "sft", dtype=torch.float32)
    heldout, _ = prepare_pairs(str(work / "heldout.jsonl"), tokenizer, config.data, progress=False)
    out: dict[str, Any] = {"reference_mib": 0.0}
    reference, second_model = reference_model(name, sft)
    if name == "precomputed":  # four floats a pair: the sums and the sums over LD-DPO's tails
        pairs = prepare_pairs(config.data.path, tokenizer, config.data, progress=False)[0]
        out["reference_mib"] = 4 * 4 * len(pairs) / 2**20
    if second_model:
        out["reference_mib"] = reference.get_memory_footprint() / 2**20
    if reference is not None and reference is not sft:
        exact, rounded = (pair_logps(m, heldout, tokenizer.pad_token_id, 32) for m in (sft, reference))
        error = torch.cat([(rounded.chosen - exact.chosen).abs(), (rounded.rejected - exact.rejected).abs()])
        tokens = torch.cat([exact.chosen_tokens, exact.rejected_tokens])
        out |= {
            "logp_error_mean": error.mean().item(),
            "logp_error_max": error.max().item(),
            "logp_error_per_token": (error / tokens).mean().item(),
        }
    policy = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    implicit = implicit_rewards(policy, sft, heldout, tokenizer.pad_token_id, BETA)
    prompts = json.loads((work / "prompts.json").read_text())
    samples = sample(policy, tokenizer, prompts * 2, 7)
    out |= {
        "heldout_accuracy_vs_fp32_reference": implicit["accuracy"],
        "true_reward": statistics.fmean(map(SentimentTask.true_reward, samples)),
    }
    return out


# --------------------------------------------------------------------------- the table


def table(rows: list[dict[str, Any]], sft_reward: float) -> str:
    copy = next((r for r in rows if r["strategy"] == "copy"), rows[0])
    header = (
        f"{'strategy':<12}{'peak MiB':>9}{'vs copy':>9}{'ref MiB':>9}{'s/step':>8}{'setup s':>8}"
        f"{'|Δlogp| mean':>13}{'max':>8}{'acc vs fp32':>12}{'true reward':>12}"
    )
    lines = [header]
    for r in rows:
        err = (
            f"{r['logp_error_mean']:>13.4f}{r['logp_error_max']:>8.3f}"
            if "logp_error_mean" in r
            else f"{'-':>13}{'-':>8}"
        )
        lines.append(
            f"{r['strategy']:<12}{r['peak_mib']:>9.0f}{r['peak_mib'] - copy['peak_mib']:>+9.0f}{r['reference_mib']:>9.2f}"
            f"{r['step_s']:>8.3f}{r['setup_s']:>8.1f}{err}{r['heldout_accuracy_vs_fp32_reference']:>12.3f}"
            f"{r['true_reward']:>12.3f}"
        )
    lines.append(f"(SFT start: true reward {sft_reward:.3f})")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    work = Path(args.work)
    if args.side:
        print("RESULT " + json.dumps(run_side(args, work, args.side)), flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    print("preparing: SFT model, on-policy pairs, held-out pairs", flush=True)
    shared = prepare(args, work)
    print(json.dumps(shared), flush=True)
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in CHILD_ARGS]
    rows = []
    for name in args.sides:
        print(f"{name}: training {args.steps} steps", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, *passed, "--side", name], capture_output=True, text=True, check=False
        )
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not found:
            sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        rows.append(json.loads(found[-1][len("RESULT ") :]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows, shared["sft_true_reward"]))
    settings = {k: v for k, v in vars(args).items() if k not in ("side", "work", "out")}
    report = {"machine": machine(), "settings": settings, **shared, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
