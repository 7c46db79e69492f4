"""Run by tests/test_distributed.py under ``accelerate launch --config_file
examples/accelerate/zero2.yaml`` (or zero3.yaml), 2 CPU processes: DeepSpeed DPO training against
a live reference (under ZeRO-3 partitioned like the policy), then the same run stopped after 2
steps and resumed from its checkpoint.

accelerate 1.15 turns DeepSpeed on only for accelerator devices (on a CPU its state counts one
process), while DeepSpeed runs on the CPU with gloo. So, for this test only, accelerate starts
as a CPU data-parallel run and the distributed type is set to DeepSpeed after the fact, with
the plugin read from the launcher's environment; from there on everything is what a GPU run
executes: accelerate's DeepSpeed preparation, the ZeRO engine and optimizer, their collectives.
DeepSpeed's shared-memory all-reduce (a C++ extension compiled on first use, used for inference
only) is left out: a GPU run does not build it either.
"""

import json
import os
import sys

import deepspeed.comm.torch
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from helpers import quiet_config, sentiment_records

import preftune.engine.harness as harness_module
from preftune.distributed import close_process_group
from preftune.experiments.synthetic import build_tokenizer, tiny_llama
from preftune.recipes.dpo import train

accelerate_accelerator = harness_module.Accelerator
deepspeed.comm.torch.build_shm_op = lambda: None


def deepspeed_on_cpu(**kwargs):
    accelerator = accelerate_accelerator(**kwargs)
    plugin = DeepSpeedPlugin()  # read from the launcher's environment
    plugin.set_mixed_precision(kwargs.get("mixed_precision", "no"))
    plugin.select(_from_accelerator_state=True)
    # ZeRO-3 keeps a weight of fewer than 1e5 elements (its default threshold) whole on every
    # process, which here is every weight: 0 shards them all, as a large model's are.
    plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    accelerator.state.deepspeed_plugins = plugin
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED  # later states copy it
    return accelerator


harness_module.Accelerator = deepspeed_on_cpu
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
        reference_model=reference,  # a live one (strategy copy), under ZeRO-3 partitioned in place
        stop_after=stop_after,
    )
    return model, reference, result


model, reference, full = run("full")


def held(weight):
    """(elements held here, elements in all): ZeRO-3 keeps half of each weight on each process
    (outside a forward the parameter itself is empty); ZeRO-2 keeps every weight whole."""
    shard = getattr(weight, "ds_tensor", weight)
    return [shard.numel(), getattr(weight, "ds_numel", weight.numel())]


def weights(model):
    return {
        "layer": held(model.model.layers[0].self_attn.q_proj.weight),
        "lm_head": held(model.lm_head.weight),  # the chunked head reads it gathered, inside the forward
        "trainable": [sum(p.requires_grad for p in model.parameters()), len(list(model.parameters()))],
    }


shards = {"policy": weights(model), "reference": weights(reference)}
run("resumed", stop_after=2)
*_, resumed = run("resumed", "train.resume=true")
if os.environ["RANK"] == "0":
    print("REPORT " + json.dumps({"full": full.history, "resumed": resumed.history, "shards": shards}))

close_process_group()  # every process finished: the group ends before the interpreter's exit
