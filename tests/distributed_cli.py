"""Run by tests/test_distributed.py under torchrun (2 CPU processes): ``preftune train``, which
ends the process group after a successful run; with ``fail``, the second process fails on its
second micro-batch, in the middle of training.

``distributed_cli.py MODEL DATA OUTPUT [fail]``
"""

import json
import os
import sys

import torch

import preftune.recipes.dpo as pairwise
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


if sys.argv[4:] == ["fail"] and os.environ["RANK"] == "1":
    pairwise.pair_stats = failing_pair_stats
sets = ["train.batch_size=2", "train.max_steps=4", "train.progress=false", "train.report_to=none"]
code = main(
    ["train", "--model", model_dir, "--data", data, "--output", output_dir, *(f"--set={s}" for s in sets)]
)
report = {"rank": int(os.environ["RANK"]), "code": code, "group": torch.distributed.is_initialized()}
sys.stdout.write(f"REPORT {json.dumps(report)}\n")  # one write: both processes print
sys.stdout.flush()
sys.exit(code)  # through the interpreter's own teardown
