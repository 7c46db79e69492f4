"""Loading tokenizers and causal LMs (hub name or local folder), dtype, LoRA / QLoRA."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..config import ModelConfig, read_template
from ..errors import ConfigError, ModelLoadError
from .quantize import bnb_config, is_quantized, quantization_device, quantized, require_bitsandbytes

__all__ = ["ModelLoadError", "load_model", "load_tokenizer", "prepare_for_training"]


def resolve_dtype(cfg: ModelConfig) -> torch.dtype:
    """``auto``: bfloat16 for a frozen LoRA base on a bf16-capable GPU, else float32 master weights
    (mixed precision then runs the matmuls in bf16 through autocast)."""
    if cfg.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and (cfg.lora or cfg.load_in_4bit):
        return torch.bfloat16
    return torch.float32


def _reason(err: Exception) -> str:
    """The first line of a library's error: enough to act on, and the CLI prints one line."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


FUNCTION_SPEC = re.compile(r"^(?:[A-Za-z_][\w.]*|.+\.py):[A-Za-z_]\w*$")
"""``module:function`` or ``file.py:function``: how a reward function is named."""


def check_local_path(path: str, key: str) -> None:
    """A path that can only be local (absolute, ``./``, ``~``, or two slashes, which no hub id
    has) must exist; otherwise the hub client would answer with a confusing repo-id error. A
    function's name given where a model is expected is said to be one."""
    if FUNCTION_SPEC.match(path) and not Path(path).expanduser().exists():
        raise ModelLoadError(
            f"{key}: '{path}' names a function (module:function), not a model folder or hub name; "
            "a reward function is given with --reward"
        )
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") >= 2
    if looks_local and not Path(path).expanduser().exists():
        raise ModelLoadError(f"{key}: {path}: no such folder")


def check_hub_reachable(name: str, key: str, revision: str | None = None) -> None:
    """A hub name that is not in the local cache needs the hub: when it cannot be reached, say so
    in one line at once, rather than letting the hub client retry for most of a minute.

    Skipped for local folders, cached names and ``HF_HUB_OFFLINE=1`` (where transformers itself
    fails at once, naming the missing files). One connection attempt, 3 seconds at most.
    """
    if Path(name).expanduser().exists():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return
    try:
        cached = any(
            try_to_load_from_cache(name, filename, revision=revision) is not None
            for filename in ("config.json", "tokenizer_config.json")
        )
    except Exception:  # not a valid repo id: transformers' own message says why
        return
    if cached:
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as err:
        raise ModelLoadError(
            f"{key}: '{name}' is not in the local cache and the hub ({endpoint.hostname}) cannot be reached "
            f"({err.strerror or err}); give a local folder, or download it on a machine with a network "
            "(HF_HUB_OFFLINE=1 skips this check)"
        ) from None


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    check_local_path(cfg.name_or_path, "model.name_or_path")
    check_hub_reachable(cfg.name_or_path, "model.name_or_path", cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:  # OSError, ValueError, HF hub errors…: one message for the user
        raise ModelLoadError(
            f"model.name_or_path: could not load a tokenizer from '{cfg.name_or_path}': {_reason(err)}"
        ) from None
    return prepare_tokenizer(tokenizer, cfg, chat_template)


def prepare_tokenizer(tokenizer: Any, cfg: ModelConfig, chat_template: str | None = None) -> Any:
    """Apply EOS / pad / chat-template overrides; fall back to EOS for padding (pads are masked)."""
    if cfg.eos_token:
        tokenizer.eos_token = cfg.eos_token
    if cfg.pad_token:
        tokenizer.pad_token = cfg.pad_token
    elif tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = read_template(chat_template)
    return tokenizer


def _load_kwargs(cfg: ModelConfig, quantize: str | None = None) -> dict[str, Any]:
    """``from_pretrained``'s arguments; ``quantize`` (``nf4``, ``int8``, ``none``; None: nf4 when
    ``model.load_in_4bit``) quantizes the weights as they load, computing in ``model.dtype``."""
    dtype = resolve_dtype(cfg)
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": dtype,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    kind = quantize or ("nf4" if cfg.load_in_4bit else "none")
    if kind != "none":
        require_bitsandbytes("model.load_in_4bit" if quantize is None else "reference.quantize")
        kwargs["quantization_config"] = bnb_config(kind, dtype)
    return kwargs


def load_model(cfg: ModelConfig, name_or_path: str | None = None, quantize: str | None = None) -> nn.Module:
    """An ``AutoModelForCausalLM`` by hub name or local path (``name_or_path`` overrides the config's),
    quantized as ``quantize`` says (None: QLoRA's NF4 base when ``model.load_in_4bit``)."""
    from transformers import AutoModelForCausalLM

    path = name_or_path or cfg.name_or_path
    key = "reference.path" if name_or_path else "model.name_or_path"
    check_local_path(path, key)
    check_hub_reachable(path, key, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(cfg, quantize))
    except Exception as err:
        raise ModelLoadError(f"{key}: could not load a causal LM from '{path}': {_reason(err)}") from None
    return model


def load_reward_model(cfg: ModelConfig, pad_token_id: int | None, say: Any = print) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` with one output: an existing reward model as it
    is, or a causal LM (hub name or folder) with a new, randomly initialised reward head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = cfg.name_or_path
    check_local_path(path, "model.name_or_path")
    try:
        model_config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as err:
        raise ModelLoadError(
            f"model.name_or_path: '{path}' is neither a reward model nor a causal LM ({_reason(err)})"
        ) from None
    architectures = getattr(model_config, "architectures", None) or []
    is_reward_model = any(a.endswith("ForSequenceClassification") for a in architectures)
    if is_reward_model and getattr(model_config, "num_labels", 1) != 1:
        raise ModelLoadError(
            f"model.name_or_path: '{path}' is a classifier with {model_config.num_labels} labels; "
            "a reward model has one output"
        )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if not is_reward_model:  # its load report lists the new head as missing: the notice below says it
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **_load_kwargs(cfg))
    except Exception as err:
        raise ModelLoadError(
            f"model.name_or_path: could not load '{path}' as a reward model "
            f"(model type '{getattr(model_config, 'model_type', '?')}'): {_reason(err)}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_reward_model:
        say(f"model: {path} has no reward head; a new one (hidden size -> 1) was initialised")
    # transformers' own pooling reads the last token that is not pad_token_id: keep the
    # saved model usable there too (preftune itself reads the score by attention mask).
    model.config.pad_token_id = pad_token_id
    return model


def prepare_for_training(model: Any, cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    """QLoRA's NF4 base, dropout off (it makes the policy and reference disagree), gradient
    checkpointing, LoRA.

    With ``model.load_in_4bit`` a model object that is not quantized yet (one passed in Python, or
    a critic built from the policy) is quantized into a new model: the object itself is not trained."""
    if cfg.load_in_4bit and not is_quantized(model):
        model = quantized(model, "nf4", resolve_dtype(cfg), quantization_device())
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora or cfg.load_in_4bit:
        model = apply_lora(model, cfg, task_type)
    return model


def disable_dropout(model: Any) -> None:
    """Zero every dropout: ``nn.Dropout`` modules, and the rates attention code reads from module
    attributes at call time (e.g. ``attention_dropout``). The config keeps its values, so saved
    checkpoints describe the model as it was published."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def apply_lora(model: nn.Module, cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> nn.Module:
    """LoRA adapters on ``cfg.lora_target_modules``; for ``SEQ_CLS`` peft also trains the new head."""
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError:
        extra = "quant" if cfg.load_in_4bit else "lora"
        raise ConfigError(f"model.lora: needs peft (pip install 'preftune[{extra}]')") from None
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # peft's default is reentrant
        )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, lora)  # type: ignore[arg-type]
    except ValueError as err:  # e.g. target modules that match nothing in this model
        raise ConfigError(f"model.lora_target_modules: {err}") from None


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def unwrap_causal_lm(model: nn.Module) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (adapters stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient: a reference, or the initial
    policy kept to measure KL against. Returns it."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
