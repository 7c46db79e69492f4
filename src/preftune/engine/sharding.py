"""What the harness does differently when the weights are sharded: FSDP2 and DeepSpeed ZeRO-2/3
through accelerate.

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

The wrapper the data-parallel engine sees is :class:`~preftune.model.logps.PolicyLogps` (the call
must be its forward), whose transformers model sits under the attribute ``model``; transformer
layers become their own shard groups from the model's ``_no_split_modules``, which accelerate
would otherwise look up on the wrapper and not find.

Under DeepSpeed (ZeRO-2: gradients and optimizer state sharded; ZeRO-3: the weights too) the
engine owns the step: it reduces the gradients at the step's last micro-batch, then clips (to
``train.max_grad_norm``, written into its config), skips a step whose gradient norm is not
finite, and updates, all in ``engine.step()``, which the harness calls where it clips
(accelerate's ``optimizer.step()`` is a no-op). preftune's own ``train.*`` settings fill the
batch, accumulation and clipping entries of the DeepSpeed config; the accelerate config says
only how to shard. The optimizer state is saved as DeepSpeed writes it, one file per process
(resuming needs the same number of processes); the weights, gathered, as under FSDP2.

A live reference (``reference.strategy=copy``, or ``reference.path``) is sharded like the
policy when the policy's weights are (:func:`reference_placement`): under FSDP2 each
transformer layer its own group plus the root, the module whose forward gives its log-probs;
under ZeRO-3 an engine without an optimizer. It stays frozen and runs under ``no_grad``, and
every call is a collective: each training micro-batch calls it as often on every process
(a constant of the objective), evaluation equalizes its batches (:func:`eval_batches`). The
precomputed reference reads the whole model once before training, unsharded, as before.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..model.reference import Placement
from .checkpoint import read_optimizer_file

WRAPPER_PREFIX = "model."
"""Where the transformers model sits inside the module the harness trains."""


ZERO_STAGES = (2, 3)
ZERO_TAG = "zero"
"""The folder DeepSpeed writes its per-process files into, inside a checkpoint's ``optimizer/``."""


def check_distributed(accelerator: Accelerator) -> None:
    """Refuse what the harness cannot run correctly: FSDP1, and DeepSpeed other than ZeRO-2/3."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "accelerate: FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config "
            "(examples/accelerate/fsdp2.yaml)"
        )
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        if plugin.zero_stage not in ZERO_STAGES:
            raise ConfigError(
                f"accelerate: DeepSpeed ZeRO stage {plugin.zero_stage} is not supported; set zero_stage: 2 or 3 "
                "(examples/accelerate/zero2.yaml, zero3.yaml), or launch with DDP (ddp.yaml)"
            )
        if getattr(plugin, "zero3_init_flag", False):
            raise ConfigError(
                "accelerate: zero3_init_flag: true is not supported (the reference copy, the precomputed "
                "reference and a resume read the whole model before it is sharded); set it to false"
            )
        return
    supported = {
        DistributedType.NO,
        DistributedType.MULTI_GPU,
        DistributedType.MULTI_CPU,
        DistributedType.FSDP,
    }
    if kind not in supported:
        raise ConfigError(
            f"accelerate: {kind.value} is not supported yet (its checkpoints and gradient clipping are not "
            "handled); launch with DDP, FSDP2 or DeepSpeed ZeRO-2/3 (examples/accelerate/)"
        )


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator: Accelerator) -> bool:
    """Each process holds a shard of the weights (FSDP2, ZeRO-3), so every forward is a collective."""
    if is_deepspeed(accelerator):
        return bool(accelerator.state.deepspeed_plugin.zero_stage == 3)
    return accelerator.distributed_type == DistributedType.FSDP


def check_and_plan(accelerator: Accelerator, model: nn.Module, cfg: Any) -> None:
    """Before ``prepare``: refuse LoRA under FSDP2 and DeepSpeed for now (the adapter-off reference
    and the merge into ``final/`` read the base weights outside the sharded forward); under FSDP2
    make each transformer layer a shard group (the transformers model's ``_no_split_modules``)
    unless the accelerate config names the layer class; under DeepSpeed fill its config from
    ``cfg`` (the run's ``train`` settings)."""
    from ..model.load import is_peft

    if not (is_sharded(accelerator) or is_deepspeed(accelerator)):
        return
    if is_peft(model):
        raise ConfigError(
            "model.lora: LoRA with FSDP2 or DeepSpeed is not supported yet; train LoRA with DDP "
            "(examples/accelerate/ddp.yaml), or full weights sharded"
        )
    if is_deepspeed(accelerator):
        _fill_deepspeed_config(accelerator, cfg)
        return
    plugin = accelerator.state.fsdp_plugin
    names = getattr(model, "_no_split_modules", None)
    if plugin.transformer_cls_names_to_wrap is None and names:
        plugin.transformer_cls_names_to_wrap = list(names)


def _fill_deepspeed_config(accelerator: Accelerator, cfg: Any) -> None:
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    config["gradient_accumulation_steps"] = cfg.grad_accum
    config["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    config["gradient_clipping"] = cfg.max_grad_norm or 0.0  # 0: DeepSpeed only measures the norm
    # final/ and the checkpoints hold the whole weights: ZeRO-3 gathers them on the main process.
    config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    # With optimizer offload, keep the run's own AdamW (same update as every other strategy, and
    # the object the learning-rate schedule steers) instead of DeepSpeed's compiled CPU Adam.
    config["zero_force_ds_cpu_optimizer"] = False
    config.setdefault("steps_per_print", 2**31 - 1)  # preftune logs the steps itself


def reference_placement(accelerator: Accelerator) -> Placement:
    """Where a reference runs: this process's device, under the run's mixed precision; when the
    policy's weights are sharded, a live reference sharded the same way (FSDP2, ZeRO-3), so that
    each process holds 4Ψ/N of an fp32 reference, not 4Ψ; else (DDP, ZeRO-2) whole on every
    device. The shard function takes the module whose forward gives the reference's log-probs
    (frozen, under ``no_grad``) and returns the module to call."""
    shard: Callable[[nn.Module], nn.Module] | None = None
    if accelerator.distributed_type == DistributedType.FSDP:
        shard = partial(_shard_frozen, accelerator)
    elif is_sharded(accelerator):
        shard = partial(_zero3_frozen, accelerator)
    return Placement(accelerator.device, accelerator.autocast, accelerator.is_main_process, shard)


def _shard_frozen(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """FSDP2, as the policy: each transformer layer its own group, then ``module``, the root whose
    call gathers the embeddings and lm_head; the policy's mesh, precision and offload settings.
    Every group is resharded after its forward: no backward will need the gathered weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    model = module.get_submodule("model")  # the transformers model inside
    layers = set(plugin.transformer_cls_names_to_wrap or getattr(model, "_no_split_modules", None) or ())
    mesh = accelerator.torch_device_mesh
    options: dict[str, Any] = {
        "mesh": None if mesh is None else mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)],
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload,
        "reshard_after_forward": True,
    }
    for layer in model.modules():
        if type(layer).__name__ in layers:
            fully_shard(layer, **options)
    fully_shard(module, **options)  # the frozen weights move to the mesh's device, shard by shard
    return module


def _zero3_frozen(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """ZeRO-3: an engine without an optimizer, which partitions the weights as the policy's are
    and gathers each layer's for its forward; the engine is the module to call. DeepSpeed moves
    the whole model to the device before partitioning it (as it does the policy)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)  # no step: nothing to optimize, schedule or offload
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    # Never stepped; DeepSpeed only checks that these entries agree with each other.
    config.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        train_batch_size=accelerator.num_processes,
        gradient_clipping=0.0,
    )
    config.setdefault("steps_per_print", 2**31 - 1)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine  # type: ignore[no-any-return]


def eval_batches(accelerator: Accelerator, examples: int, shard: int, batch_size: int) -> int:
    """How many evaluation batches this process runs: its own, or under sharding (every forward
    a collective) as many as the largest shard needs, on every process."""
    if is_sharded(accelerator):
        shard = math.ceil(examples / accelerator.num_processes)
    return math.ceil(shard / batch_size)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """After ``prepare``: FSDP2 replaces every parameter by its shard, so the list is taken anew."""
    return [p for p in module.parameters() if p.requires_grad]


def numel(parameter: nn.Parameter) -> int:
    """A parameter's whole size (ZeRO-3 leaves an empty tensor in its place and keeps the size)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def backward(accelerator: Accelerator, wrapped: nn.Module, loss: Tensor, last_micro: bool) -> None:
    """Backward of one micro-batch. Under DeepSpeed the gradients are reduced at the step's last
    one, and the loss is not divided again by the accumulation (the harness divided it already)."""
    if not is_deepspeed(accelerator):
        accelerator.backward(loss)
        return
    engine: Any = wrapped
    engine.set_gradient_accumulation_boundary(last_micro)
    engine.backward(loss, scale_wrt_gas=False)


def clip_gradients(
    accelerator: Accelerator, wrapped: nn.Module, trainable: list[nn.Parameter], max_norm: float
) -> Tensor:
    """Clip to ``max_norm`` (infinite: only measure); returns the norm over the whole model.
    Under DeepSpeed this is its ``engine.step()``: clip, then update unless the norm is not
    finite (the norm it returns tells the harness the step was skipped)."""
    if is_deepspeed(accelerator):
        engine: Any = wrapped
        engine.step()
        norm = engine.get_global_grad_norm()
        return torch.tensor(math.inf if norm is None else float(norm), device=accelerator.device)
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
    state = accelerator.get_state_dict(wrapped) or {}  # ZeRO-3: on the main process only
    return {
        name[len(WRAPPER_PREFIX) :] if name.startswith(WRAPPER_PREFIX) else name: tensor
        for name, tensor in state.items()
    }


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state(
    accelerator: Accelerator, wrapped: nn.Module, optimizer: Any, checkpoint: Path
) -> dict[str, Any] | Path | None:
    """What the main process saves as ``checkpoint``'s optimizer state: the whole state keyed
    by parameter name (FSDP2), or a folder beside it into which every process wrote its part
    (DeepSpeed; a hidden ``.tmp-`` one, dropped at the next start if the run dies before it is
    moved in); None when not sharded (the optimizer's own ``state_dict``). Every process must
    call it."""
    if is_deepspeed(accelerator):
        folder = checkpoint.parent / f".tmp-optimizer-{checkpoint.name}"
        if accelerator.is_main_process and folder.exists():
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        engine: Any = wrapped
        engine.save_checkpoint(str(folder), tag=ZERO_TAG, save_latest=False)
        accelerator.wait_for_everyone()  # every file written before the main process moves the folder
        return folder
    if not is_sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, _torch_optimizer(optimizer), options=_options())


def optimizer_loader(accelerator: Accelerator, wrapped: nn.Module, optimizer: Any) -> Callable[[Path], None]:
    """How a checkpoint (its folder) gives the optimizer state back: whole (one process, DDP);
    sharded, each process keeping its shards (FSDP2); each process its own file (DeepSpeed)."""
    if is_deepspeed(accelerator):
        return lambda path: _load_zero_state(accelerator, wrapped, path)
    if not is_sharded(accelerator):
        return lambda path: optimizer.load_state_dict(read_optimizer_file(path))
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    def load(path: Path) -> None:
        state = read_optimizer_file(path)
        set_optimizer_state_dict(wrapped, _torch_optimizer(optimizer), state, options=_options())

    return load


def _load_zero_state(accelerator: Accelerator, wrapped: nn.Module, path: Path) -> None:
    folder = path / "optimizer"
    files = sorted((folder / ZERO_TAG).glob("*optim_states.pt"))
    if not files:
        raise CheckpointError(
            f"{path}: no DeepSpeed optimizer files in it (it was not written under DeepSpeed); resume with "
            "the accelerate config the run was started with"
        )
    if len(files) != accelerator.num_processes:
        raise CheckpointError(
            f"{path}: written by {len(files)} processes, this run has {accelerator.num_processes}; DeepSpeed "
            "resumes its sharded optimizer state only on as many processes"
        )
    engine: Any = wrapped
    loaded, _ = engine.load_checkpoint(
        str(folder), tag=ZERO_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load its optimizer state from {folder}")


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one
