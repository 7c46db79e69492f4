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
from common import (
    MODELS,
    case_lengths,
    gemm_limit_gflops,
    machine,
    median,
    peak_mib,
    rss_mib,
    synthetic_records,
)

SIDES = ("trl", "padded", "prefix_shared", "packed")
CASES = ("short", "long", "ragged")
OBJECTIVES = ("dpo", "simpo")
SUITES = {
    # (model, case, objective) configurations, and runs per side
    "quick": ([("7m", case, "dpo") for case in CASES], 2),
    "full": (
        [(m, c, o) for m in ("7m", "60m") for c in CASES for o in OBJECTIVES] + [("128k", "short", "dpo")],
        2,
    ),
}
BATCH, LEARNING_RATE, MAX_LENGTH = 8, 1e-5, 1024
RESULTS = Path(__file__).parent / "results"


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
    import preftune.recipes.dpo as pairwise
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
            f"train.logps_chunk_size={args.logps_chunk_size or 'null'}",
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
    """One process, one side, one configuration: per-step seconds, extra peak memory, losses, and
    this machine's GEMM rate measured just before (so a busy machine lowers both alike)."""
    from preftune.experiments.synthetic import build_tokenizer

    torch.set_num_threads(args.threads)
    gemm = gemm_limit_gflops()
    tokenizer = build_tokenizer(vocab_size=512)
    model = MODELS[args.model].build(seed=0)
    lengths = case_lengths(args.case, BATCH, seed=1)
    records = synthetic_records(tokenizer, lengths, seed=2)
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
    seconds = median(steps)
    flops = MODELS[args.model].step_flops(lengths)
    return {
        "system": "trl" if args.side == "trl" else f"preftune-{args.side}",
        "model": args.model,
        "case": args.case,
        "objective": args.objective,
        "threads": args.threads,
        "examples_per_step": BATCH,
        "tokens_per_step": sum(p + c + r for p, c, r in lengths),
        "seconds_per_step": seconds,
        "step_seconds": steps,
        "pairs_per_s": BATCH / seconds,
        "tokens_per_s": sum(p + c + r for p, c, r in lengths) / seconds,
        "useful_gflops_per_step": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "gemm_limit_gflops": gemm,
        "fraction_of_gemm_limit": flops / seconds / 1e9 / gemm,
        "peak_mib": peak_mib(),
        "extra_peak_mib": peak_mib() - baseline,
        "losses": losses,
        **machine(),
    }


def _spawn(args: argparse.Namespace, side: str, model: str, case: str, objective: str) -> dict:
    command = [sys.executable, str(Path(__file__)), "--side", side, "--model", model, "--case", case]
    command += ["--objective", objective, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--threads", str(args.threads)]
    if args.logps_chunk_size:
        command += ["--logps-chunk-size", str(args.logps_chunk_size)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} {model}/{case}/{objective} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Medians per side of one configuration's runs, with ratios to TRL and to the padded layout."""
    sides: dict[str, list[dict]] = {}
    for run in runs:
        sides.setdefault(run["system"].removeprefix("preftune-"), []).append(run)
    table: dict[str, dict] = {}
    for side, rs in sides.items():
        table[side] = {
            key: median([r[key] for r in rs])
            for key in ("seconds_per_step", "pairs_per_s", "tokens_per_s", "extra_peak_mib")
        }
        table[side]["fraction_of_gemm_limit"] = median([r["fraction_of_gemm_limit"] for r in rs])
        table[side]["runs"] = len(rs)
    for side, row in table.items():
        for peer in ("trl", "padded"):
            if peer in table:
                row[f"speed_vs_{peer}"] = row["pairs_per_s"] / table[peer]["pairs_per_s"]
                row[f"memory_vs_{peer}"] = row["extra_peak_mib"] / table[peer]["extra_peak_mib"]
        if "trl" in sides and side != "trl":
            base, mine = sides["trl"][0]["losses"], sides[side][0]["losses"]
            row["max_loss_gap_vs_trl"] = max(abs(a - b) for a, b in zip(base, mine, strict=True))
    return table


def _report(model: str, case: str, objective: str, runs: list[dict]) -> list[str]:
    shape, table = MODELS[model], summarize(runs)
    first = next(iter(table.values()))
    lines = [
        f"\n{model} ({shape.parameters() / 1e6:.1f}M params, vocab {shape.vocab}), {case}, {objective}: "
        f"medians of {first['runs']} runs; {runs[0]['tokens_per_step']} tokens a step",
        f"{'side':15}{'s/step':>9}{'pairs/s':>9}{'% GEMM':>8}{'peak MiB':>10}"
        f"{'speed vs trl':>14}{'mem vs trl':>12}{'vs padded':>11}{'max |Δloss|':>13}",
    ]
    for side, row in table.items():
        speed = f"{row['speed_vs_trl']:.2f}x" if "speed_vs_trl" in row else "-"
        memory = f"{row['memory_vs_trl']:.2f}x" if "memory_vs_trl" in row else "-"
        padded = f"{row['speed_vs_padded']:.2f}x" if "speed_vs_padded" in row else "-"
        gap = f"{row['max_loss_gap_vs_trl']:.1e}" if "max_loss_gap_vs_trl" in row else "-"
        lines.append(
            f"{side:15}{row['seconds_per_step']:>9.3f}{row['pairs_per_s']:>9.2f}"
            f"{100 * row['fraction_of_gemm_limit']:>7.0f}%{row['extra_peak_mib']:>10.0f}"
            f"{speed:>14}{memory:>12}{padded:>11}{gap:>13}"
        )
    return lines


def _save(model: str, case: str, objective: str, runs: list[dict]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{model}-{case}-{objective}.json"
    body = {"summary": summarize(runs), "runs": runs}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(body, indent=1) + "\n")
    partial.replace(path)
    return path


# The speed and memory targets: (what, model, case, objective, side, figure, at least (or at most, if < 0)).
TARGETS = [
    ("DPO long, ~60M: packed vs TRL's fastest", "60m", "long", "dpo", "packed", "speed_vs_trl", 3.0),
    ("DPO long, ~60M: packed vs padded", "60m", "long", "dpo", "packed", "speed_vs_padded", 1.6),
    ("DPO short, 7M: packed vs TRL", "7m", "short", "dpo", "packed", "speed_vs_trl", 2.0),
    ("DPO short, ~60M: packed vs TRL", "60m", "short", "dpo", "packed", "speed_vs_trl", 2.0),
    ("ragged, 7M: packed vs padded", "7m", "ragged", "dpo", "packed", "speed_vs_padded", 1.3),
    ("ragged, ~60M: packed vs padded", "60m", "ragged", "dpo", "packed", "speed_vs_padded", 1.3),
    ("SimPO ragged, 7M: packed vs CPOTrainer", "7m", "ragged", "simpo", "packed", "speed_vs_trl", 1.3),
    ("SimPO long, ~60M: packed vs CPOTrainer", "60m", "long", "simpo", "packed", "speed_vs_trl", 1.3),
    ("128k vocabulary: extra peak memory vs TRL", "128k", "short", "dpo", "packed", "memory_vs_trl", -0.35),
    ("128k, long prompts: extra peak memory vs TRL", "128k", "long", "dpo", "packed", "memory_vs_trl", -0.35),
    ("~60M long: FLOP rate / GEMM limit", "60m", "long", "dpo", "packed", "fraction_of_gemm_limit", 0.6),
]


def report_targets() -> None:
    """The targets against every saved result in bench/results/."""
    print(f"{'target':45}{'wanted':>9}{'measured':>10}  verdict")
    for what, model, case, objective, side, figure, bound in TARGETS:
        path = RESULTS / f"{model}-{case}-{objective}.json"
        row = json.loads(path.read_text())["summary"].get(side, {}) if path.exists() else {}
        wanted = f"{'<=' if bound < 0 else '>='}{abs(bound):g}"
        if figure not in row:
            print(f"{what:45}{wanted:>9}{'-':>10}  not measured")
            continue
        value, met = row[figure], row[figure] <= -bound if bound < 0 else row[figure] >= bound
        print(f"{what:45}{wanted:>9}{value:>10.2f}  {'met' if met else 'MISSED'}")


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
    parser.add_argument(
        "--logps-chunk-size", type=int, help="preftune's train.logps_chunk_size (default: its auto size)"
    )
    parser.add_argument("--targets", action="store_true", help="print the targets against bench/results/")
    args = parser.parse_args()
    if args.targets:
        report_targets()
        return
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
        runs = [_spawn(args, side, model, case, objective) for _ in range(repeats) for side in args.sides]
        print("\n".join(_report(model, case, objective, runs)), flush=True)
        print(f"saved {_save(model, case, objective, runs)}", flush=True)
    print()
    report_targets()


if __name__ == "__main__":
    main()
