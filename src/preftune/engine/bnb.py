"""bitsandbytes in a run: the optimizer (torch's AdamW, or AdamW with 8-bit states) and what a
launch refuses, before any model loads.

8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") keeps each
moment as one byte per parameter plus a float per block of 256: 2 bytes a parameter instead of 8.
bitsandbytes keeps tensors under 4096 elements (biases, norms, small LoRA matrices) in 32-bit.
The paged variant puts the state in CUDA unified memory, which the GPU driver evicts to the host
under memory pressure; on a CPU there is nothing to page, so it runs as ``adamw_8bit`` (the same
update) and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..config import RunConfig, TrainConfig
from ..errors import ConfigError
from ..model.quantize import check_available
from . import sharding


def check_bitsandbytes(config: RunConfig, accelerator: Accelerator, say: Callable[..., None]) -> None:
    """bitsandbytes installed where the run needs it; QLoRA, a quantized reference and 8-bit
    optimizer states refused under FSDP2 and DeepSpeed (bitsandbytes' weights and states are not
    DTensors and are not partitioned); the 8-bit optimizer tried once on this device."""
    check_available(config)
    sharded = sharding.is_sharded(accelerator) or sharding.is_deepspeed(accelerator)
    launch = "DeepSpeed" if sharding.is_deepspeed(accelerator) else "FSDP2"
    settings = (
        ("model.load_in_4bit", config.model.load_in_4bit),
        ("reference.quantize", config.reference.quantize != "none"),
        ("train.optimizer", config.train.optimizer != "adamw"),
    )
    for key, used in settings:
        if used and sharded:
            raise ConfigError(
                f"{key}: bitsandbytes' quantized weights and 8-bit optimizer states cannot be sharded under "
                f"{launch}; launch with DDP (examples/accelerate/ddp.yaml)"
            )
    if config.train.optimizer == "adamw":
        return
    device = accelerator.device
    _probe(config.train.optimizer, device)
    if config.train.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        say(
            f"train.optimizer: paged_adamw_8bit on {device.type}: nothing to page without a GPU; "
            "it runs as adamw_8bit (the same update)"
        )


def _optimizer_class(name: str, device: torch.device) -> Any:
    import bitsandbytes as bnb

    paged = name == "paged_adamw_8bit" and device.type == "cuda"
    return bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit


def _probe(name: str, device: torch.device) -> None:
    """One 8-bit step on a tensor large enough to get 8-bit states: a device bitsandbytes has no
    kernel for says so now, not at the first step of a loaded model."""
    parameter = nn.Parameter(torch.zeros(4096, device=device))
    try:
        optimizer = _optimizer_class(name, device)([parameter], lr=1e-3)
        parameter.grad = torch.ones_like(parameter)
        optimizer.step()
    except Exception as err:  # bitsandbytes' error for a backend it lacks, whatever its type
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"train.optimizer: {name} does not run on {device} with this bitsandbytes ({reason}); use adamw"
        ) from None


def build_optimizer(trainable: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> Any:
    """``train.optimizer`` over ``trainable``, with the run's AdamW settings."""
    settings = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(trainable, **settings)  # type: ignore[arg-type]
    return _optimizer_class(cfg.optimizer, device)(trainable, **settings)
