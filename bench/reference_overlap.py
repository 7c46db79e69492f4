"""Does overlapping the live reference's forward with the policy's step pay on this machine?

A DPO step with a live reference runs the reference forward (no grad) and the policy's forward
and backward on the same batch. They are independent, so the reference forward of the *next*
batch can run in a second thread while the policy trains on this one. Two ways, interleaved
(sequential, overlapped, sequential, …), the same packed batches, the same thread count for
torch's intra-op pool, median seconds per micro-batch over the passes:

* ``sequential`` — reference forward, then policy forward + backward (what preftune does);
* ``overlapped`` — the next batch's reference forward in a worker thread during this batch's
  policy forward + backward (torch releases the GIL inside its kernels).

The reference log-probs of both must be equal. On a CPU both computations already spread
over every core, so overlapping can only pay if one leaves cores idle; on a GPU the question
is one of CUDA streams, which this script does not measure.

    python bench/reference_overlap.py                  # 60m, long, 4 batches of 8 pairs, 2 threads
    python bench/reference_overlap.py --model 7m --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from common import MODELS, case_lengths, median, synthetic_records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="60m")
    parser.add_argument("--case", choices=["short", "long", "ragged"], default="long")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs a micro-batch")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from preftune.config import DataConfig
    from preftune.data import prepare_pairs
    from preftune.data.packing import collate_for
    from preftune.experiments.synthetic import build_tokenizer
    from preftune.model.logps import LogpsRequest, PolicyLogps
    from preftune.model.reference import ModelReference

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(vocab_size=512)
    count = args.batches * args.batch_size
    records = synthetic_records(tokenizer, case_lengths(args.case, count, seed=10), seed=0)
    pairs = prepare_pairs(records, tokenizer, DataConfig(max_length=2048), progress=False)[0]
    collate = collate_for("packed", tokenizer.pad_token_id)
    batches = [collate(pairs[i : i + args.batch_size]) for i in range(0, count, args.batch_size)]
    model = MODELS[args.model].build(seed=0)
    policy = PolicyLogps(model, LogpsRequest(stats=("mean_logit",))).train()  # as a DPO policy
    reference = ModelReference(copy.deepcopy(model))

    def policy_step(batch) -> None:
        policy(batch).logps.sum().backward()

    def sequential() -> list[torch.Tensor]:
        out = []
        for batch in batches:
            out.append(reference.logps(batch))
            policy_step(batch)
        return out

    def overlapped(pool: ThreadPoolExecutor) -> list[torch.Tensor]:
        out, pending = [], pool.submit(reference.logps, batches[0])
        for k, batch in enumerate(batches):
            current = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(reference.logps, batches[k + 1])
            policy_step(batch)
            out.append(current)
        return out

    with ThreadPoolExecutor(max_workers=1) as pool:
        ways = {"sequential": sequential, "overlapped": lambda: overlapped(pool)}
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        results: dict[str, list[torch.Tensor]] = {}
        policy_step(batches[0])  # warm-up
        for _ in range(args.passes):
            for name, way in ways.items():
                start = time.perf_counter()
                results[name] = way()
                seconds[name].append((time.perf_counter() - start) / len(batches))
                model.zero_grad(set_to_none=False)
    shape = MODELS[args.model]
    print(
        f"{args.model} ({shape.parameters() / 1e6:.1f}M params), {args.case}, packed; {args.batches} micro-batches "
        f"of {args.batch_size} pairs; fp32 CPU, {args.threads} threads; medians of {args.passes} passes"
    )
    base = median(seconds["sequential"])
    for name in ways:
        print(
            f"{name:12}{median(seconds[name]):8.3f} s per micro-batch   {base / median(seconds[name]):.2f}x"
        )
    gap = max(
        (a - b).abs().max().item() for a, b in zip(results["sequential"], results["overlapped"], strict=True)
    )
    print(f"max |reference logp(sequential) - reference logp(overlapped)| = {gap:.1e}")


if __name__ == "__main__":
    main()
