"""Run by tests/test_distributed.py under torchrun (2 CPU processes): ``preftune train`` in which
the second process fails on its second micro-batch, in the middle of training."""

import os
import sys

import preftune.recipes.pairwise as pairwise
from preftune.cli import main

model_dir, data, output_dir = sys.argv[1:4]
original = pairwise.pair_stats
calls = 0


def failing_pair_stats(*args, **kwargs):
    global calls
    calls += 1
    if calls == 2:
        raise ValueError("a bad batch on rank 1")
    return original(*args, **kwargs)


if os.environ["RANK"] == "1":
    pairwise.pair_stats = failing_pair_stats
sets = ["train.batch_size=2", "train.max_steps=4", "train.progress=false", "train.report_to=none"]
sys.exit(
    main(
        ["train", "--model", model_dir, "--data", data, "--output", output_dir, *(f"--set={s}" for s in sets)]
    )
)
