"""Run by tests/test_distributed.py under ``accelerate launch --config_file
examples/accelerate/fsdp2.yaml`` (2 CPU processes): FSDP2 DPO training against a live reference
sharded like the policy, then the same run stopped after 2 steps and resumed from its checkpoint;
then 2 steps of reward-model training and of SFT.

accelerate 1.15 turns FSDP on only for accelerator devices (on a CPU it falls back to DDP),
while torch's ``fully_shard`` runs on CPU with gloo. So, for this test only, the distributed
type accelerate decided is set to FSDP after the fact; from there on everything is what a GPU
run executes: accelerate's FSDP2 preparation, ``fully_shard``, DTensor collectives.
"""

import json
import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from helpers import quiet_config, sentiment_records
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import preftune.engine.harness as harness_module
from preftune.distributed import close_process_group
from preftune.experiments.synthetic import build_tokenizer, tiny_llama, tiny_reward_model
from preftune.recipes.dpo import train
from preftune.recipes.reward import train_reward_model
from preftune.recipes.sft import train_sft

accelerate_accelerator = harness_module.Accelerator


def fsdp2_on_cpu(**kwargs):
    accelerator = accelerate_accelerator(**kwargs)
    assert os.environ["FSDP_VERSION"] == "2"  # what the example config asked for
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it
    return accelerator


harness_module.Accelerator = fsdp2_on_cpu
output_dir = sys.argv[1]
tokenizer = build_tokenizer()
settings = ["train.batch_size=2", "train.max_steps=4", "train.scheduler=linear", "train.eval_every=2"]
settings += ["train.seed=3", "train.save_every=2", "train.max_grad_norm=0.5", "reference.strategy=copy"]


def run(folder, *extra, stop_after=None):
    model, reference = tiny_llama(len(tokenizer), seed=8), tiny_llama(len(tokenizer), seed=9)
    result = train(
        quiet_config(f"{output_dir}/{folder}", *settings, *extra),
        model=model,
        tokenizer=tokenizer,
        train_data=sentiment_records(16, seed=4),
        eval_data=sentiment_records(5, seed=9),  # shards of 3 and 2: one process repeats a batch
        reference_model=reference,  # a live one (strategy copy), sharded in place like the policy
        stop_after=stop_after,
    )
    return model, reference, result


model, reference, full = run("full")


def rows(weight):
    """(rows held here, rows in all): a sharded weight holds half of them on each process."""
    return [weight.to_local().shape[0] if isinstance(weight, DTensor) else None, weight.shape[0]]


def held(model):
    return {
        "groups": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "layer": rows(model.model.layers[0].self_attn.q_proj.weight),
        "lm_head": rows(model.lm_head.weight),  # the chunked head reads it gathered, inside the forward
        "trainable": [sum(p.requires_grad for p in model.parameters()), len(list(model.parameters()))],
    }


shards = {"policy": held(model), "reference": held(reference)}
run("resumed", stop_after=2)
*_, resumed = run("resumed", "train.resume=true")
records = sentiment_records(16, seed=4)
short = ["train.batch_size=2", "train.max_steps=2"]
reward = train_reward_model(
    quiet_config(f"{output_dir}/rm", *short),
    model=tiny_reward_model(len(tokenizer), seed=4),
    tokenizer=tokenizer,
    train_data=records,
)
sft = train_sft(
    quiet_config(f"{output_dir}/sft", *short),
    model=tiny_llama(len(tokenizer), seed=4),
    tokenizer=tokenizer,
    train_data=[{"prompt": r["prompt"], "completion": r["chosen"]} for r in records],
)
if os.environ["RANK"] == "0":
    histories = {
        "full": full.history,
        "resumed": resumed.history,
        "reward": reward.history,
        "sft": sft.history,
    }
    print("REPORT " + json.dumps({**histories, "shards": shards}))

close_process_group()  # every process finished: the group ends before the interpreter's exit
