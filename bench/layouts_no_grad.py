"""The layouts outside policy training: the reference precompute and evaluation's pair log-probs.

One process, one model; after an untimed warm-up on one batch, each pass runs every layout in
turn (interleaved, so a busy machine slows them alike), and the median seconds over the passes
are reported with the ratio to the padded layout, and the largest difference of any figure
(sums, L2 norms) from the padded layout's, relative to its size.

    python bench/layouts_no_grad.py                        # 60m, 32 pairs of 256 + 64 + 64 tokens
    python bench/layouts_no_grad.py --model 7m --case ragged
"""

from __future__ import annotations

import argparse
import time

import torch
from common import MODELS, case_lengths, median, synthetic_records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="60m")
    parser.add_argument("--case", choices=["short", "long", "ragged"], default="long")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs a batch (reference.batch_size)")
    parser.add_argument("--layouts", nargs="+", default=["padded", "prefix_shared", "packed"])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from preftune.config import DataConfig
    from preftune.data import prepare_pairs
    from preftune.experiments.synthetic import build_tokenizer
    from preftune.model.reference import Batching, ModelReference, precompute
    from preftune.model.set_logps import pair_logps

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(vocab_size=512)
    records = synthetic_records(tokenizer, case_lengths(args.case, args.pairs, seed=10), seed=0)
    pairs = prepare_pairs(records, tokenizer, DataConfig(max_length=2048), progress=False)[0]
    model = MODELS[args.model].build(seed=0)
    reference, pad = ModelReference(model), tokenizer.pad_token_id

    def reference_pass(layout: str, some: list | None = None) -> torch.Tensor:
        tables = precompute(reference, some or pairs, Batching(pad, args.batch_size, layout), progress=False)
        return torch.cat([tables["chosen"], tables["rejected"]]).double()

    def eval_pass(layout: str, some: list | None = None) -> torch.Tensor:
        out = pair_logps(model, some or pairs, pad, args.batch_size, layout=layout)
        return torch.cat([out.chosen, out.rejected, out.chosen_norm, out.rejected_norm])

    tasks = {"reference precompute": reference_pass, "pair_logps (eval)": eval_pass}
    seconds: dict[tuple[str, str], list[float]] = {}
    values: dict[tuple[str, str], torch.Tensor] = {}
    for run in tasks.values():
        for layout in args.layouts:
            run(layout, pairs[: args.batch_size])
    for _ in range(args.passes):
        for task, run in tasks.items():
            for layout in args.layouts:
                start = time.perf_counter()
                values[task, layout] = run(layout)
                seconds.setdefault((task, layout), []).append(time.perf_counter() - start)

    lengths = sorted({(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs})
    shown = ", ".join(map(str, lengths[:3])) + (", …" if len(lengths) > 3 else "")
    print(
        f"{args.model}, {args.case}: {len(pairs)} pairs (prompt, chosen, rejected tokens: {shown}), "
        f"{args.batch_size} pairs a batch; fp32 CPU, {args.threads} threads, medians of {args.passes} passes"
    )
    print(f"{'task':22} {'layout':14} {'seconds':>8} {'vs padded':>10} {'max rel. Δ vs padded':>21}")
    for task in tasks:
        padded = median(seconds[task, "padded"]) if "padded" in args.layouts else float("nan")
        for layout in args.layouts:
            taken = median(seconds[task, layout])
            padded_values = values.get((task, "padded"))
            delta = (
                float("nan")
                if padded_values is None
                else ((values[task, layout] - padded_values).abs() / padded_values.abs()).max().item()
            )
            print(f"{task:22} {layout:14} {taken:8.2f} {taken / padded:9.2f}x {delta:21.1e}")


if __name__ == "__main__":
    main()
