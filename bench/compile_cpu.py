"""Does ``torch.compile`` of the policy's forward + backward pay on CPU?

One process; the model's decoder eager, then compiled (inductor, ``dynamic=True`` so that
batches of other widths do not recompile). Both run the same micro-batches: ``--batches``
different batches of 8 pairs (ragged lengths, so their shapes differ, as in training), in the
given layout, forward + backward of the summed sequence log-probs, visited ``--rounds`` times.
Reported: the first compiled call (the compile), and the median seconds per micro-batch
after the first round.

    python bench/compile_cpu.py
    python bench/compile_cpu.py --model 60m --case long --layout padded
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
    parser.add_argument("--model", choices=sorted(MODELS), default="7m")
    parser.add_argument("--case", choices=["short", "long", "ragged"], default="ragged")
    parser.add_argument("--layout", choices=["padded", "prefix_shared", "packed"], default="packed")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from preftune.config import DataConfig
    from preftune.data import prepare_pairs
    from preftune.data.packing import collate_for
    from preftune.experiments.synthetic import build_tokenizer
    from preftune.model.logps import LogpsRequest, sequence_logps

    torch.set_num_threads(args.threads)
    dpo_request = LogpsRequest(stats=("mean_logit",))  # what a DPO step computes beside the log-probs
    tokenizer = build_tokenizer(vocab_size=512)
    collate = collate_for(args.layout, tokenizer.pad_token_id)
    batches = []
    for seed in range(args.batches):
        records = synthetic_records(tokenizer, case_lengths(args.case, 8, seed=10 + seed), seed=seed)
        batches.append(
            collate(prepare_pairs(records, tokenizer, DataConfig(max_length=1024), progress=False)[0])
        )

    def seconds(model: torch.nn.Module) -> tuple[float, float]:
        times = []
        for _ in range(args.rounds):
            for batch in batches:
                start = time.perf_counter()
                sequence_logps(model, batch, dpo_request).logps.sum().backward()
                times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        return times[0], median(times[len(batches) :])

    shape = MODELS[args.model]
    _, eager = seconds(shape.build(seed=0))
    compiled_model = shape.build(seed=0)
    compiled_model.model = torch.compile(compiled_model.model, dynamic=True)
    first, compiled = seconds(compiled_model)
    print(
        f"{args.model}, {args.case}, {args.layout}: {args.batches} batches of 8 pairs (shapes "
        f"{', '.join(str(tuple(b.input_ids.shape)) for b in batches)}), fp32 CPU, {args.threads} threads"
    )
    print(f"eager     {eager:.3f} s per micro-batch (median)")
    print(f"compiled  {compiled:.3f} s per micro-batch (median); first call {first:.1f} s (the compile)")
    print(f"compiled / eager = {compiled / eager:.2f}")


if __name__ == "__main__":
    main()
