"""bitsandbytes quantization: QLoRA's 4-bit base, a quantized frozen reference, and the plain
weights a quantized run saves in ``final/``.

* ``nf4``: 4-bit NormalFloat with double quantization (Dettmers et al. 2023, QLoRA), about 0.56
  bytes a weight; the matmuls dequantize to the compute dtype, ``model.dtype``.
* ``int8``: LLM.int8() (Dettmers et al. 2022), one byte a weight plus a scale per row; outlier
  input features (|x| > 6) go through a 16-bit matmul.

Only the linear layers of the decoder are quantized (transformers leaves the embeddings and the
output head as they are). Both run on a CPU with bitsandbytes >= 0.48, which the tests rely on.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..errors import ConfigError

EXTRA = "pip install 'preftune[quant]'"
KINDS = ("nf4", "int8")


def require_bitsandbytes(key: str) -> None:
    """One line naming the extra to install, before anything loads."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}: needs bitsandbytes ({EXTRA})") from None


def check_available(config: RunConfig) -> None:
    """bitsandbytes installed when a setting needs it, named in one line before anything loads."""
    settings = (
        ("model.load_in_4bit", config.model.load_in_4bit),
        ("reference.quantize", config.reference.quantize != "none"),
        ("train.optimizer", config.train.optimizer != "adamw"),
    )
    for key, used in settings:
        if used:
            require_bitsandbytes(key)


def bnb_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``kind``: QLoRA's NF4 with double quantization
    (the compute dtype is the model's, not a fixed bfloat16: on a CPU that is float32), or int8."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "int8":
        _quiet_int8_cast()
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {kind!r}; use one of {KINDS}")


def quantization_device() -> torch.device:
    """Where bitsandbytes quantizes a model object, as transformers places one it loads: the
    current GPU, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast() -> None:
    """bitsandbytes logs at every int8 matmul outside a GPU that its inputs are cast to float16:
    that is LLM.int8()'s own rounding, part of the error docs/train.md measures; once in the docs
    is enough."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


def _base(model: nn.Module) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_quantized(model: nn.Module) -> bool:
    """Loaded through bitsandbytes (4- or 8-bit), directly or under a PEFT wrapper."""
    base = _base(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def plain_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weights of a plain or PEFT model under the plain model's names, LoRA left out: the
    weights a reference with adapters off computes with."""
    out = {}
    for name, tensor in _base(model).state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        out[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))] = tensor
    return out


def quantized(model: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A new, frozen ``kind``-quantized model from ``model``'s weights (a PEFT model's base
    weights), built on ``device``; ``model`` is left as it is. No full-precision copy is made:
    each weight is quantized as it is loaded."""
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    from transformers.utils import logging as hf_logging

    base = _base(model)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" of an object already in memory says nothing
    try:
        built: Any = type(base).from_pretrained(
            None,
            config=copy.deepcopy(base.config),
            state_dict=plain_weights(model),
            dtype=next(base.parameters()).dtype,
            quantization_config=bnb_config(kind, compute_dtype),
            device_map={"": device},
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(base, "generation_config", None) is not None:  # a reward model has none
        built.generation_config = copy.deepcopy(base.generation_config)
    # Where the weights came from, as loading records it: peft's save looks a missing name up on the hub.
    built.config.name_or_path = built.name_or_path = base.config.name_or_path
    built.eval()
    for parameter in built.parameters():
        parameter.requires_grad_(False)
    return built


def _dequantized(module: nn.Module, dtype: torch.dtype) -> Tensor:
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module).detach().to(dtype).cpu()


def dequantized_weights(model: nn.Module) -> tuple[dict[str, Tensor], Any]:
    """The full weights of a bitsandbytes model, on the CPU in the dtype it was loaded in, with
    every active LoRA delta added (``W = dequant(Q) + B A · α/r``), and its config without the
    quantization settings: a model that ``from_pretrained`` loads as a plain one.

    Built one layer at a time; the live model keeps its quantized weights and its adapters."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    base = _base(model)
    config = copy.deepcopy(base.config)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = {name: tensor.detach().to("cpu") for name, tensor in plain_weights(model).items()}
    quantized_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            lora: Any = module
            weight = _dequantized(lora.get_base_layer(), dtype)
            for adapter in lora.active_adapters:
                if adapter in lora.lora_A:
                    weight = weight + lora.get_delta_weight(adapter).detach().to(dtype).cpu()
        elif isinstance(module, quantized_types) and ".base_layer" not in name:
            weight = _dequantized(module, dtype)
        else:
            continue
        plain = name.replace(".base_layer", "")
        state = [k for k in weights if k.startswith(f"{plain}.weight") and k != f"{plain}.weight"]
        state += [f"{plain}.SCB"] * (f"{plain}.SCB" in weights)
        for key in state:  # the quantization state (absmax, quant_map, ...): a plain model has none
            del weights[key]
        weights[f"{plain}.weight"] = weight
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return weights, config


def save_dequantized(model: nn.Module, folder: Path) -> None:
    """``folder`` as ``save_pretrained`` writes a plain model: config, generation config and
    safetensors shards of :func:`dequantized_weights`."""
    from huggingface_hub import save_torch_state_dict

    weights, config = dequantized_weights(model)
    config.save_pretrained(folder)
    generation = getattr(_base(model), "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    save_torch_state_dict(weights, folder, metadata={"format": "pt"})
