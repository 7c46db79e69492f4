"""Run by tests/test_distributed.py under torchrun (2 CPU processes) or alone (1 process).

``distributed_run.py OUTPUT BATCH_SIZE [kto]``: DPO on pairs, or KTO on unpaired examples that all
share one prompt (so the KL rows of a step are the same set however the step is split) against a
reference other than the starting policy (so the KL estimate is not 0 from the start).
"""

import json
import os
import sys

from helpers import quiet_config, sentiment_records, unpaired_records

from preftune.distributed import close_process_group
from preftune.experiments.synthetic import build_tokenizer, tiny_llama
from preftune.recipes.dpo import train

output_dir, batch_size = sys.argv[1], int(sys.argv[2])
kto = sys.argv[3:] == ["kto"]
tokenizer = build_tokenizer()
cfg = quiet_config(
    output_dir,
    f"train.batch_size={batch_size}",
    "train.max_steps=4",
    "train.scheduler=linear",
    "train.eval_every=2",
    "train.seed=3",
    *(["objective.loss=kto"] if kto else []),
)
if kto:
    train_data = [{**r, "prompt": "review of the park:"} for r in unpaired_records(16, seed=4)]
    eval_data = unpaired_records(3, seed=9)
else:
    train_data, eval_data = sentiment_records(16, seed=4), sentiment_records(3, seed=9)
# 3 eval examples: the two processes get shards of different sizes.
result = train(
    cfg,
    model=tiny_llama(len(tokenizer), seed=8),
    tokenizer=tokenizer,
    train_data=train_data,
    eval_data=eval_data,
    reference_model=tiny_llama(len(tokenizer), seed=9) if kto else None,
)
if os.environ.get("RANK", "0") == "0":
    print("HISTORY " + json.dumps(result.history))

close_process_group()  # every process finished: the group ends before the interpreter's exit
