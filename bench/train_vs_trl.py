"""Training steps: preftune's three layouts against TRL 1.16's trainers, on the same models and data.

For every configuration (model × case × objective) each side trains a randomly initialised
Llama-style model built from a config, on the same synthetic pairs, with the same
hyperparameters: fp32, AdamW at 1e-5 with a linear schedule, clipping at 1.0, 8 pairs a step
(the same 8 every step, so the two sides' losses must agree step by step whatever their data
order). DPO runs against TRL's ``DPOTrainer``, SimPO against ``CPOTrainer(loss_type="simpo")``;
DPO uses each side's fastest reference, a precomputed one (TRL's ``precompute_ref_log_probs``).

Every run is its own process (peak memory is per process); the sides alternate
(trl, padded, prefix_shared, packed, trl, …) ``--repeats`` times, and the figures are medians:
seconds per optimizer step after ``--warmup`` steps, and the extra peak resident memory over the
built model.

    python bench/train_vs_trl.py                # quick: 7m model, DPO, three cases (a few minutes)
    python bench/train_vs_trl.py --suite full   # 7m and 60m × cases × DPO/SimPO, and the 128k vocabulary
    python bench/train_vs_trl.py --models 60m --cases long --objectives dpo simpo --sides trl packed

Naming models, cases or objectives runs every combination of those named (default 7m, every
case, DPO).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from common import MODELS, case_lengths, median, peak_mib, rss_mib, synthetic_records

SIDES = ("trl", "padded", "prefix_shared", "packed")
CASES = ("short", "long", "ragged")
OBJECTIVES = ("dpo", "simpo")
SUITES = {
    # (model, case, objective) configurations, and runs per side
    "quick": ([("7m", case, "dpo") for case in CASES], 2),
    "full": (
        [(m, c, o) for m in ("7m", "60m") for c in CASES for o in OBJECTIVES] + [("128k", "short", "dpo")],
        3,
    ),
}
BATCH, LEARNING_RATE, MAX_LENGTH = 8, 1e-5, 1024


def _trl_trainer(args: argparse.Namespace, model, tokenizer, records, out: str, callbacks):
    from datasets import Dataset

    common = dict(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_steps=args.warmup + args.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=1,
        max_length=MAX_LENGTH,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    data = Dataset.from_list(records)
    if args.objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        config = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5)
        return CPOTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks
        )
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True)
    return DPOTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks
    )


def _preftune_train(args: argparse.Namespace, model, tokenizer, records, out: str, on_step):
    import preftune.recipes.pairwise as pairwise
    from preftune.config import load_config

    objective = (
        ["objective.loss=[simpo]"] if args.objective == "simpo" else ["reference.strategy=precomputed"]
    )
    config = load_config(
        overrides=[
            f"train.output_dir={out}",
            f"train.batch_size={BATCH}",
            f"train.max_steps={args.warmup + args.steps}",
            f"train.learning_rate={LEARNING_RATE}",
            "train.max_grad_norm=1.0",
            "train.log_every=1",
            "train.save_every=null",
            "train.progress=false",
            "train.report_to=none",
            "train.mixed_precision=no",
            f"data.max_length={MAX_LENGTH}",
            f"data.layout={args.side}",
            *objective,
        ]
    )
    original = pairwise.summarize

    def timed_summarize(*a, **k):  # called once per logged (= every) step
        on_step()
        return original(*a, **k)

    pairwise.summarize = timed_summarize
    result = pairwise.train(config, model=model, tokenizer=tokenizer, train_data=records)
    return [h["loss"] for h in result.history if "loss" in h]


def run_side(args: argparse.Namespace) -> dict:
    """One process, one side, one configuration: per-step seconds, extra peak memory, losses."""
    from preftune.synthetic import build_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(vocab_size=512)
    model = MODELS[args.model].build(seed=0)
    records = synthetic_records(tokenizer, case_lengths(args.case, BATCH, seed=1), seed=2)
    stamps: list[float] = []
    baseline = rss_mib()
    with TemporaryDirectory() as out:
        if args.side == "trl":
            from transformers import TrainerCallback

            class Clock(TrainerCallback):
                def on_step_end(self, *a, **k):
                    stamps.append(time.perf_counter())

            trainer = _trl_trainer(args, model, tokenizer, records, out, [Clock()])
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        else:
            losses = _preftune_train(
                args, model, tokenizer, records, out, lambda: stamps.append(time.perf_counter())
            )
    # Stamps at the end of every step: the intervals after the last warm-up step are the timed steps.
    steps = [b - a for a, b in itertools.pairwise(stamps)][args.warmup - 1 :]
    return {"seconds_per_step": median(steps), "extra_peak_mib": peak_mib() - baseline, "losses": losses}


def _spawn(args: argparse.Namespace, side: str, model: str, case: str, objective: str) -> dict:
    command = [sys.executable, str(Path(__file__)), "--side", side, "--model", model, "--case", case]
    command += ["--objective", objective, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} {model}/{case}/{objective} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(model: str, case: str, objective: str, runs: dict[str, list[dict]]) -> list[str]:
    shape = MODELS[model]
    lines = [
        f"\n{model} ({shape.parameters() / 1e6:.1f}M params, vocab {shape.vocab}), {case}, {objective}: "
        f"medians of {len(next(iter(runs.values())))} runs",
        f"{'side':15}{'s/step':>9}{'peak MiB':>10}{'speed vs trl':>14}{'mem vs trl':>12}{'max |Δloss|':>13}",
    ]
    seconds = {side: median([r["seconds_per_step"] for r in rs]) for side, rs in runs.items()}
    memory = {side: median([r["extra_peak_mib"] for r in rs]) for side, rs in runs.items()}
    base = runs.get("trl")
    for side in runs:
        speed = f"{seconds['trl'] / seconds[side]:.2f}x" if base else "-"
        mem = f"{memory[side] / memory['trl']:.2f}x" if base else "-"
        gap = "-"
        if base and side != "trl":
            gap = f"{max(abs(a - b) for a, b in zip(base[0]['losses'], runs[side][0]['losses'], strict=True)):.1e}"
        lines.append(f"{side:15}{seconds[side]:>9.3f}{memory[side]:>10.0f}{speed:>14}{mem:>12}{gap:>13}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--cases", nargs="+", choices=CASES)
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--repeats", type=int, help="runs per side (interleaved); default: the suite's")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them (>= 1)")
    parser.add_argument("--threads", type=int, default=2)
    # One run (what the orchestrator spawns):
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--objective", choices=OBJECTIVES)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    configurations, suite_repeats = SUITES[args.suite]
    if args.models or args.cases or args.objectives:  # every combination of the ones named
        configurations = list(
            itertools.product(args.models or ["7m"], args.cases or list(CASES), args.objectives or ["dpo"])
        )
    repeats = args.repeats or suite_repeats
    print(
        f"fp32 CPU, {args.threads} threads, torch {torch.__version__}; {BATCH} pairs a step, "
        f"{args.warmup} warm-up + {args.steps} timed steps a run; sides interleaved, {repeats} runs each"
    )
    for model, case, objective in configurations:
        runs: dict[str, list[dict]] = {side: [] for side in args.sides}
        for _ in range(repeats):
            for side in args.sides:
                runs[side].append(_spawn(args, side, model, case, objective))
        print("\n".join(_report(model, case, objective, runs)), flush=True)


if __name__ == "__main__":
    main()
