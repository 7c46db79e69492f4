"""What the harness does differently when the weights are sharded (FSDP2 through accelerate).

Under DDP every process holds the whole model, so the main process can save it alone and
clipping sees whole gradients. Under FSDP2 (``fully_shard``) each process holds a shard of
every parameter as a ``DTensor``, so:

* the full weights and optimizer state are gathered by every process together (a collective)
  and written by the main process: ``final/`` and checkpoints stay ``save_pretrained`` folders
  that transformers and vLLM load as is, and the optimizer file holds the whole state;
* the gradient norm is reduced over every shard before clipping;
* the weights of a resumed run load into the whole model before it is sharded, the optimizer
  state after (it follows the shards);
* every forward is a collective (each layer all-gathers its weights), so evaluation runs the
  same number of batches on every process.

The wrapper the data-parallel engine sees is :class:`~preftune.logps.PolicyLogps` (the call
must be its forward), whose transformers model sits under the attribute ``model``; transformer
layers become their own shard groups from the model's ``_no_split_modules``, which accelerate
would otherwise look up on the wrapper and not find.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from ..errors import ConfigError

WRAPPER_PREFIX = "model."
"""Where the transformers model sits inside the module the harness trains."""


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse what the harness cannot run correctly: FSDP1 and DeepSpeed."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "accelerate: FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config "
            "(examples/accelerate/fsdp2.yaml)"
        )
    supported = {
        DistributedType.NO,
        DistributedType.MULTI_GPU,
        DistributedType.MULTI_CPU,
        DistributedType.FSDP,
    }
    if kind not in supported:
        raise ConfigError(
            f"accelerate: {kind.value} is not supported yet (its checkpoints and gradient clipping are not "
            "handled); launch with DDP or FSDP2 (examples/accelerate/)"
        )


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_and_plan(accelerator: Accelerator, model: nn.Module) -> None:
    """Before ``prepare``: refuse LoRA under FSDP2 for now (the adapter-off reference and the
    merge into ``final/`` read the base weights outside the sharded forward), and make each
    transformer layer a shard group (the transformers model's ``_no_split_modules``) unless the
    accelerate config names the layer class."""
    from ..models import is_peft

    if not is_sharded(accelerator):
        return
    if is_peft(model):
        raise ConfigError(
            "model.lora: LoRA with FSDP2 is not supported yet; train LoRA with DDP (examples/accelerate/ddp.yaml), "
            "or full weights with FSDP2"
        )
    plugin = accelerator.state.fsdp_plugin
    names = getattr(model, "_no_split_modules", None)
    if plugin.transformer_cls_names_to_wrap is None and names:
        plugin.transformer_cls_names_to_wrap = list(names)


def eval_batches(accelerator: Accelerator, examples: int, shard: int, batch_size: int) -> int:
    """How many evaluation batches this process runs: its own, or under sharding (every forward
    a collective) as many as the largest shard needs, on every process."""
    if is_sharded(accelerator):
        shard = math.ceil(examples / accelerator.num_processes)
    return math.ceil(shard / batch_size)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """After ``prepare``: FSDP2 replaces every parameter by its shard, so the list is taken anew."""
    return [p for p in module.parameters() if p.requires_grad]


def clip_gradients(accelerator: Accelerator, trainable: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip to ``max_norm`` (infinite: only measure); returns the norm over the whole model."""
    if not is_sharded(accelerator):
        return accelerator.clip_grad_norm_(trainable, max_norm).detach()
    # Each process holds a shard of every gradient; the norm of DTensors is reduced over all of them.
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    return _full(norm).detach()


def _full(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_weights(accelerator: Accelerator, wrapped: nn.Module) -> dict[str, Tensor] | None:
    """The whole model's weights on the main process's host, keyed as the transformers model
    names them (None when not sharded: the model saves itself). Every process must call it."""
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(wrapped)
    return {
        name[len(WRAPPER_PREFIX) :] if name.startswith(WRAPPER_PREFIX) else name: tensor
        for name, tensor in state.items()
    }


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state(accelerator: Accelerator, wrapped: nn.Module, optimizer: Any) -> dict[str, Any] | None:
    """The whole optimizer state, keyed by parameter name, on the main process (None when not
    sharded: the optimizer's own ``state_dict``). Every process must call it."""
    if not is_sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, _torch_optimizer(optimizer), options=_options())


def optimizer_loader(accelerator: Accelerator, wrapped: nn.Module, optimizer: Any) -> Any:
    """How a checkpoint's optimizer state goes back: sharded, each process keeps its shards."""
    if not is_sharded(accelerator):
        return optimizer.load_state_dict
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    def load(state: dict[str, Any]) -> None:
        set_optimizer_state_dict(wrapped, _torch_optimizer(optimizer), state, options=_options())

    return load


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one
