"""Peak memory and time of sequence log-probs (forward + backward) at a real vocabulary size.

Three ways to get the summed completion log-probs of a DPO batch, each run in its own
process so that peak RSS is not shared:

* ``plain``    — ``model(...).logits`` then ``log_softmax`` and a gather: the textbook way
                 (and TRL 0.x's); the ``[rows, T, vocab]`` logits and log-softmax exist whole.
* ``trl``      — TRL 1.16's fused LM head (``add_fused_lm_head``), the peer we match.
* ``preftune`` — ``preftune.model.logps.sequence_logps``: only completion positions reach the
                 lm_head, in checkpointed chunks.

    .venv/bin/python bench/logps_memory.py            # Qwen2.5-like vocabulary (151,936)
    .venv/bin/python bench/logps_memory.py --vocab 32000 --pairs 4 --prompt 384 --completion 128

Prints each variant's extra peak memory over the model and batch, its time, and the
ratios against ``plain`` and ``trl``; checks that all three give the same log-probs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import peak_mib, rss_mib


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    from preftune.data.layouts import SequenceBatch
    from preftune.experiments.synthetic import tiny_llama
    from preftune.model.logps import LogpsRequest, full_logits_sequence_logps, sequence_logps

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    length = args.prompt + args.completion
    model = tiny_llama(args.vocab, args.hidden, args.layers, heads=8, seed=0, max_positions=max(512, length))
    rows, length = 2 * args.pairs, args.prompt + args.completion
    input_ids = torch.randint(0, args.vocab, (rows, length))
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, args.prompt :] = 1
    # The completion tokens as flat positions, and the row (sequence) each counts towards.
    label_index = completion_mask.reshape(-1).nonzero().squeeze(1)
    label_sequence = label_index // length
    if args.variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        labels = input_ids.masked_fill(completion_mask == 0, -100)

    def compute() -> torch.Tensor:
        if args.variant == "plain":
            return full_logits_sequence_logps(model, input_ids, attention_mask, completion_mask)
        if args.variant == "trl":
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
            return out.log_probs.sum(dim=1)
        batch = SequenceBatch(input_ids, attention_mask, label_index, label_sequence, torch.arange(rows))
        return sequence_logps(model, batch, LogpsRequest(stats=("mean_logit",)), args.chunk).logps

    compute().sum().backward()  # warm-up: allocator pools, lazy inits
    model.zero_grad(set_to_none=False)  # keep gradient buffers: every variant needs them
    baseline = rss_mib()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logps = compute()
        logps.sum().backward()
        timings.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=False)
    return {
        "extra_peak_mib": max(peak_mib() - baseline, 0.0),
        "seconds": min(timings),
        "logps": logps.detach().tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=["plain", "trl", "preftune"])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: preftune's auto)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    passthrough = [a for a in sys.argv[1:]]
    results = {}
    for variant in ("plain", "trl", "preftune"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, *passthrough],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    rows, tokens = 2 * args.pairs, 2 * args.pairs * (args.prompt + args.completion)
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.pairs} pairs = {rows} rows × "
        f"{args.prompt}+{args.completion} tokens ({tokens} tokens); fp32 on CPU, {args.threads} threads"
    )
    logits_mib = tokens * args.vocab * 4 / 2**20
    print(f"full logits tensor alone: {logits_mib:.0f} MiB\n")
    print(
        f"{'variant':10}{'extra peak MiB':>16}{'fwd+bwd s':>12}{'mem vs plain':>14}{'mem vs trl':>12}{'time vs trl':>13}"
    )
    for variant, r in results.items():
        print(
            f"{variant:10}{r['extra_peak_mib']:>16.0f}{r['seconds']:>12.2f}"
            f"{r['extra_peak_mib'] / results['plain']['extra_peak_mib']:>14.2f}"
            f"{r['extra_peak_mib'] / results['trl']['extra_peak_mib']:>12.2f}"
            f"{r['seconds'] / results['trl']['seconds']:>13.2f}"
        )
    reference = torch.tensor(results["plain"]["logps"])
    for variant in ("trl", "preftune"):
        gap = (torch.tensor(results[variant]["logps"]) - reference).abs().max().item()
        print(f"max |logp({variant}) − logp(plain)| = {gap:.2e}")


if __name__ == "__main__":
    main()
