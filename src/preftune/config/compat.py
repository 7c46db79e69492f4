"""The tables: every field of TRL 1.16's trainer configs (DPO, Reward, SFT, KTO, CPO, ORPO), of the
TRL command line's ``ModelConfig``, ``ScriptArguments`` and dataset mixtures, the names older TRL
releases used, and every field of LLaMA-Factory's arguments, each with the preftune key it becomes
or why it has none (:class:`~.foreign.Rule`). ``tests/test_compat.py`` reads TRL's dataclasses from
the installed TRL, so a field a new release adds fails the tests until it is classified here;
``docs/from-trl.md`` is generated from these tables (``preftune config --mapping trl``).

Decisions behind the rows are in the docs page; the conversions below say why in their docstrings.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .foreign import (
    Context,
    Rule,
    Setting,
    converted,
    each,
    ignored,
    llamafactory_dataset,
    names_list,
    number,
    plain,
    refused,
    same,
    steps,
)

# --------------------------------------------------------------------------- conversions


def _max_steps(value: Any, ctx: Context) -> list[Setting]:
    """HF's ``-1`` (and any value <= 0) means "not set": epochs decide."""
    v = number(value, "max_steps")
    return [("train.max_steps", int(v) if v > 0 else None)]


def _steps_of(name: str, key: str) -> Any:
    def convert(value: Any, ctx: Context) -> list[Setting]:
        return [] if plain(value) is None else [(key, steps(value, name, key))]

    return convert


_SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant_with_warmup": "constant",
    "constant": "constant",
}


def _scheduler(value: Any, ctx: Context) -> list[Setting]:
    """preftune's ``constant`` warms up when asked (HF's ``constant_with_warmup``); HF's plain
    ``constant`` ignores a warmup it is given, so that combination is refused rather than changed."""
    name = str(plain(value))
    if name not in _SCHEDULERS:
        closest = (
            "constant"
            if name in ("inverse_sqrt", "reduce_lr_on_plateau", "warmup_stable_decay")
            else "cosine"
        )
        closest = "linear" if name == "polynomial" else closest
        raise ConfigError(
            f"{ctx.source}: lr_scheduler_type={name} has no preftune equivalent; closest: train.scheduler={closest} "
            "(linear, cosine or constant)"
        )
    warmup = number(ctx.get("warmup_steps", 0), "warmup_steps") or number(
        ctx.get("warmup_ratio", 0), "warmup_ratio"
    )
    if name == "constant" and warmup:
        raise ConfigError(
            f"{ctx.source}: lr_scheduler_type=constant ignores the warmup it is given in HF's Trainer; "
            "closest: constant_with_warmup (train.scheduler=constant with the warmup) or no warmup"
        )
    return [("train.scheduler", _SCHEDULERS[name])]


def _warmup_steps(value: Any, ctx: Context) -> list[Setting]:
    """transformers 5 reads a ``warmup_steps`` in (0, 1) as a share of all steps."""
    v = number(value, "warmup_steps")
    if 0 < v < 1:
        return [("train.warmup_ratio", v)]
    return [("train.warmup_steps", int(v))]


def _logging_strategy(value: Any, ctx: Context) -> list[Setting]:
    if plain(value) == "epoch":
        raise ConfigError(
            f"{ctx.source}: logging_strategy=epoch has no preftune equivalent; closest: train.log_every=N steps"
        )
    return []


def _save_strategy(value: Any, ctx: Context) -> list[Setting]:
    """``no``: no periodic checkpoints (preftune still checkpoints when a signal stops the run)."""
    name = "no" if plain(value) is False else plain(value)  # YAML 1.1 reads a bare `no` as false
    if name in ("epoch", "best"):
        raise ConfigError(
            f"{ctx.source}: save_strategy={name} has no preftune equivalent; closest: train.save_every=N steps"
        )
    return [("train.save_every", None)] if name == "no" else []


def _eval_strategy(value: Any, ctx: Context) -> list[Setting]:
    """TRL's scripts evaluate the same dataset's ``dataset_test_split`` only when evaluation is on,
    every ``eval_steps`` (``logging_steps`` when unset, as HF's Trainer)."""
    name = plain(value)
    if name in (None, False, "no"):
        return []
    if name != "steps":
        raise ConfigError(
            f"{ctx.source}: eval_strategy={name} has no preftune equivalent; closest: train.eval_every=N steps"
        )
    every = ctx.get("eval_steps") or ctx.get("logging_steps", 10 if ctx.source == "trl" else 500)
    settings: list[Setting] = [("train.eval_every", steps(every, "eval_steps", "train.eval_every"))]
    if ctx.source == "trl" and ctx.given("dataset_name") and not ctx.given("datasets"):
        settings += [
            ("data.eval_path", _dataset_path(ctx)),
            ("data.eval_split", str(ctx.get("dataset_test_split", "test"))),
        ]
    elif ctx.source == "llamafactory" and not ctx.given("eval_dataset"):
        raise ConfigError(
            "llamafactory: eval_strategy=steps evaluates val_size or eval_dataset; name eval_dataset"
        )
    return settings


def _unused_without_eval(value: Any, ctx: Context) -> list[Setting]:
    return []


def _precision(value: Any, ctx: Context) -> list[Setting]:
    """``bf16``/``fp16``: autocast, as ``train.mixed_precision``; TRL's unset ``bf16`` means bf16
    wherever it can run, which is preftune's ``auto``."""
    bf16, fp16 = plain(ctx.get("bf16")), plain(ctx.get("fp16", False))
    if bf16 and fp16:
        raise ConfigError(f"{ctx.source}: bf16 and fp16 are both true; choose one (train.mixed_precision)")
    if fp16:
        return [("train.mixed_precision", "fp16")]
    if bf16 is None:
        return []
    return [("train.mixed_precision", "bf16" if bf16 else "no")]


_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def _report_to(value: Any, ctx: Context) -> list[Setting]:
    names = ["none"] if plain(value) is None else names_list(value) or ["none"]
    for name in names:
        if name == "all":
            raise ConfigError(
                f"{ctx.source}: report_to=all: name the trackers (train.report_to: {', '.join(_TRACKERS)})"
            )
        if name not in (*_TRACKERS, "none"):
            raise ConfigError(
                f"{ctx.source}: report_to={name} has no preftune equivalent; closest: train.report_to "
                f"({', '.join(_TRACKERS)} or none; metrics.jsonl is always written)"
            )
    return [("train.report_to", names)]


def _max_grad_norm(value: Any, ctx: Context) -> list[Setting]:
    v = number(value, "max_grad_norm")
    return [("train.max_grad_norm", v if v > 0 else None)]


_OPTIMIZERS = {
    **dict.fromkeys(
        ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_torch_npu_fused", "adamw_torch_xla"), "adamw"
    ),
    # bitsandbytes' AdamW with 8-bit moments (the same 4096-element floor for 32-bit ones)
    **dict.fromkeys(("adamw_8bit", "adamw_bnb_8bit"), "adamw_8bit"),
    "paged_adamw_8bit": "paged_adamw_8bit",
}


def _optim(value: Any, ctx: Context) -> list[Setting]:
    """AdamW under its implementations' names is AdamW; bitsandbytes' 8-bit AdamW and its paged form
    are ``train.optimizer``'s; any other optimizer is refused."""
    name = str(plain(value))
    if name not in _OPTIMIZERS:
        closest = (
            "paged_adamw_8bit" if name.startswith("paged_") else "adamw_8bit" if "8bit" in name else "adamw"
        )
        raise ConfigError(
            f"{ctx.source}: optim={value} has no preftune equivalent; closest: train.optimizer={closest} "
            "(adamw, adamw_8bit or paged_adamw_8bit; for memory, also model.lora or model.load_in_4bit)"
        )
    return [("train.optimizer", _OPTIMIZERS[name])]


def _resume(value: Any, ctx: Context) -> list[Setting]:
    """``true``: the newest checkpoint in the output folder; a path: that checkpoint (preftune's;
    a Trainer's checkpoint is refused when the run starts, naming what to do instead)."""
    v = plain(value)
    if v is None or v is False:
        return []
    return [("train.resume", True if v is True else str(value))]


def _sampling(value: Any, ctx: Context) -> list[Setting]:
    name = plain(value)
    if name == "group_by_length":
        raise ConfigError(
            f"{ctx.source}: train_sampling_strategy=group_by_length has no preftune equivalent; closest: "
            "data.layout=packed (no padding at all)"
        )
    return [("train.shuffle", name != "sequential")]


def _negated(key: str) -> Any:
    def convert(value: Any, ctx: Context) -> list[Setting]:
        v = plain(value)
        return [] if v is None else [(key, not v)]

    return convert


def _when_true(key: str, target: Any) -> Any:
    def convert(value: Any, ctx: Context) -> list[Setting]:
        return [(key, target)] if plain(value) is True else []

    return convert


def _not_null(key: str) -> Any:
    def convert(value: Any, ctx: Context) -> list[Setting]:
        return [] if plain(value) is None else [(key, value)]

    return convert


_INIT_KWARGS = {
    "revision": "model.revision",
    "dtype": "model.dtype",
    "torch_dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "trust_remote_code": "model.trust_remote_code",
}


def _model_init_kwargs(value: Any, ctx: Context) -> list[Setting]:
    if plain(value) is None:
        return []
    if not isinstance(value, dict):
        raise ConfigError(f"{ctx.source}: model_init_kwargs: expected a mapping, got {value!r}")
    settings = []
    for name, v in value.items():
        if name in _INIT_KWARGS:
            settings.append((_INIT_KWARGS[name], v))
        elif name not in ("device_map", "low_cpu_mem_usage", "use_cache"):
            closest = "model.load_in_4bit" if name == "quantization_config" else "the model section"
            raise ConfigError(
                f"{ctx.source}: model_init_kwargs.{name} has no preftune equivalent; closest: {closest}"
            )
    return settings


_CPO_ONLY = ("cpo_alpha", "simpo_gamma", "alpha")
_CPO_LOSS = {
    "sigmoid": "cpo",
    "hinge": "cpo_hinge",
    "ipo": "cpo_ipo",
    "simpo": "cpo_simpo",
    "alphapo": "cpo_simpo",
}
_REFERENCE_FREE = {"sigmoid": "cpo", "hinge": "cpo_hinge", "ipo": "cpo_ipo"}


def _objective(value: Any, ctx: Context) -> list[Setting]:
    """``loss_type`` with what changes its meaning: CPOConfig's names are reference-free variants
    (``sigmoid`` is CPO), legacy ``aot_pair`` is today's ``aot_unpaired``, legacy ``rpo_alpha``
    adds an NLL term, legacy ``reference_free`` drops the reference (CPO's losses with
    ``cpo_alpha`` 0); SFT's ``nll`` is preftune's SFT loss."""
    if ctx.command == "sft":
        name = str(plain(ctx.get("loss_type", "nll")))
        if name != "nll":
            raise ConfigError(
                f"{ctx.source}: loss_type={name} (SFT) has no preftune equivalent; closest: nll"
            )
        return []
    losses = [{"aot_pair": "aot_unpaired"}.get(n, n) for n in names_list(ctx.get("loss_type", "sigmoid"))]
    if "kto_pair" in losses:
        raise ConfigError(
            f"{ctx.source}: loss_type=kto_pair has no preftune equivalent; closest: kto (pairs are unpaired)"
        )
    settings: list[Setting] = []
    cpo = any(ctx.given(n) for n in _CPO_ONLY) or any(n in ("simpo", "alphapo") for n in losses)
    if cpo:
        cpo_alpha = number(ctx.get("cpo_alpha", 1.0), "cpo_alpha")
        losses = [
            ("simpo" if cpo_alpha == 0 and n in ("simpo", "alphapo") else _CPO_LOSS.get(n, n)) for n in losses
        ]
        if not ctx.given("beta"):  # CPOConfig's beta is 0.1 for every loss; preftune's SimPO default is 2.0
            settings.append(("objective.beta", 0.1))
    elif plain(ctx.get("reference_free")) is True:
        if any(n not in _REFERENCE_FREE for n in losses):
            raise ConfigError(
                f"{ctx.source}: reference_free with loss_type={losses}: only sigmoid, hinge and ipo have one"
            )
        losses = [_REFERENCE_FREE[n] for n in losses]
        settings.append(("objective.cpo_alpha", 0.0))
    weights = plain(ctx.get("loss_weights"))
    rpo = plain(ctx.get("rpo_alpha"))
    if rpo is not None:
        weights = [*(weights or [1.0] * len(losses)), number(rpo, "rpo_alpha")]
        losses = [*losses, "sft"]
    settings.append(("objective.loss", losses))
    if weights is not None:
        settings.append(("objective.weights", [number(w, "loss_weights") for w in weights]))
    return settings


def _rslora(value: Any, ctx: Context) -> list[Setting]:
    """rsLoRA scales the update by alpha/sqrt(r), exactly plain LoRA with alpha*sqrt(r)."""
    if plain(value) is not True:
        return []
    r = number(ctx.get("lora_r", ctx.get("lora_rank", 16 if ctx.source == "trl" else 8)), "lora_r")
    alpha = number(ctx.get("lora_alpha", 32 if ctx.source == "trl" else 2 * r), "lora_alpha")
    scaled = alpha * r**0.5
    if scaled != int(scaled):
        raise ConfigError(
            f"{ctx.source}: use_rslora scales by lora_alpha/sqrt(r), which plain LoRA matches only with an "
            f"integer lora_alpha*sqrt(r) = {scaled:.3f}; closest: model.lora_alpha={round(scaled)}"
        )
    return [("model.lora_alpha", int(scaled))]


def _lora_alpha(value: Any, ctx: Context) -> list[Setting]:
    """With ``use_rslora`` the alpha it scales decides (whatever the order the names came in)."""
    if plain(ctx.get("use_rslora")) is True:
        return _rslora(True, ctx)
    if plain(value) is None:  # LLaMA-Factory's unset lora_alpha is twice the rank
        return [("model.lora_alpha", 2 * int(number(ctx.get("lora_rank", 8), "lora_rank")))]
    return [("model.lora_alpha", value)]


def _chat_template_path(value: Any, ctx: Context) -> list[Setting]:
    path = plain(value)
    if path is None:
        return []
    if not str(path).endswith((".jinja", ".j2", ".txt")):
        raise ConfigError(
            f"{ctx.source}: chat_template_path={path}: a tokenizer's template is read from a Jinja file here; "
            "closest: data.chat_template=<file.jinja>"
        )
    return [("data.chat_template", str(path))]


def _dataset_path(ctx: Context) -> str:
    """A hub dataset and its configuration, as ``data.path`` names them: ``name:config``."""
    config = ctx.get("dataset_config")
    return f"{ctx.get('dataset_name')}" + (f":{config}" if config else "")


def _dataset_name(value: Any, ctx: Context) -> list[Setting]:
    return [] if plain(value) is None else [("data.path", _dataset_path(ctx))]


def _dataset_config(value: Any, ctx: Context) -> list[Setting]:
    if plain(value) is not None and not ctx.given("dataset_name"):
        raise ConfigError(f"{ctx.source}: dataset_config needs dataset_name (data.path=name:config)")
    return [("data.path", _dataset_path(ctx))] if plain(value) is not None else []


def _split_of(key: str) -> Any:
    def convert(value: Any, ctx: Context) -> list[Setting]:
        streaming = ctx.get("dataset_streaming") or ctx.get("streaming")
        split = str(plain(value))
        return [(key, f"stream:{split}" if streaming and key == "data.split" else split)]

    return convert


def _streaming(value: Any, ctx: Context) -> list[Setting]:
    """Streaming is spelled in the split (``stream:train``): the split is what every reader of a
    hub set receives."""
    if plain(value) is not True:
        return []
    split = ctx.get("dataset_train_split", "train")
    mixture = ctx.get("datasets")
    if isinstance(mixture, list) and len(mixture) == 1 and isinstance(mixture[0], dict):
        split = mixture[0].get("split", "train")
    return [("data.split", f"stream:{split}")]


_ENTRY = {"path", "name", "data_dir", "data_files", "split", "columns", "fraction"}


def _datasets(value: Any, ctx: Context) -> list[Setting]:
    """A mixture of one dataset is that dataset; several are refused (preftune reads one source)."""
    entries = plain(value)
    if not entries:
        return []
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        raise ConfigError(
            f"{ctx.source}: datasets: a mixture of {len(entries) if isinstance(entries, list) else '?'} datasets has "
            "no preftune equivalent; closest: concatenate them into one file for data.path"
        )
    entry = entries[0]
    for name, v in entry.items():
        if name not in _ENTRY:
            raise ConfigError(
                f"{ctx.source}: datasets[0].{name}: unknown field ({', '.join(sorted(_ENTRY))})"
            )
        if name in ("data_dir", "fraction") and plain(v) is not None:
            raise ConfigError(
                f"{ctx.source}: datasets[0].{name} has no preftune equivalent; closest: data.path"
            )
    files = names_list(entry["data_files"]) if plain(entry.get("data_files")) is not None else []
    if len(files) > 1 or isinstance(entry.get("data_files"), dict):
        raise ConfigError(
            f"{ctx.source}: datasets[0].data_files: several files; closest: one file for data.path"
        )
    path = files[0] if files else f"{entry['path']}" + (f":{entry['name']}" if entry.get("name") else "")
    split = str(entry.get("split", "train"))
    return [("data.path", path), ("data.split", f"stream:{split}" if ctx.get("streaming") else split)]


# --------------------------------------------------------------------------- LLaMA-Factory's conversions

_STAGES = {"dpo": "train", "kto": "train", "rm": "rm train", "sft": "sft"}


def _stage(value: Any, ctx: Context) -> list[Setting]:
    """The stage names the command; KTO is ``preftune train`` with the ``kto`` objective."""
    stage = str(plain(value))
    if stage not in _STAGES:
        closest = {"ppo": "preftune ppo (its own config)", "pt": "preftune sft on {text} records"}.get(
            stage, ""
        )
        raise ConfigError(
            f"llamafactory: stage={stage} has no preftune equivalent"
            + (f"; closest: {closest}" if closest else "")
        )
    command = _STAGES[stage]
    if ctx.command is not None and ctx.command != command:
        raise ConfigError(
            f"llamafactory: stage={stage} is trained by 'preftune {command}', not by 'preftune {ctx.command}'"
        )
    return [("objective.loss", ["kto"])] if stage == "kto" else []


def _finetuning_type(value: Any, ctx: Context) -> list[Setting]:
    kind = str(plain(value))
    if kind not in ("lora", "full"):
        raise ConfigError(
            f"llamafactory: finetuning_type={kind} has no preftune equivalent; closest: lora or full"
        )
    return [("model.lora", kind == "lora")]


def _lora_target(value: Any, ctx: Context) -> list[Setting]:
    names = names_list(value)
    return [("model.lora_target_modules", "all-linear" if names == ["all"] else names)]


_PREF_LOSS = {"sigmoid": "sigmoid", "hinge": "hinge", "ipo": "ipo", "orpo": "orpo", "simpo": "simpo"}


def _pref_loss(value: Any, ctx: Context) -> list[Setting]:
    """``pref_ftx`` adds ``pref_ftx`` times the chosen completion's mean token NLL: preftune's ``sft``."""
    if plain(ctx.get("stage", "sft")) != "dpo":
        return []
    name = str(plain(ctx.get("pref_loss", "sigmoid")))
    if name not in _PREF_LOSS:
        closest = "kto (pairs are unpaired)" if name == "kto_pair" else ", ".join(_PREF_LOSS)
        raise ConfigError(f"llamafactory: pref_loss={name} has no preftune equivalent; closest: {closest}")
    ftx = number(ctx.get("pref_ftx", 0.0), "pref_ftx")
    if ftx:
        return [("objective.loss", [_PREF_LOSS[name], "sft"]), ("objective.weights", [1.0, ftx])]
    return [("objective.loss", [_PREF_LOSS[name]])]


def _lf_dataset(key: str) -> Any:
    """An entry of ``dataset_info.json``; the command line converts its records (ShareGPT, Alpaca)
    to preftune's as it reads them, keeping ``max_samples`` of them."""

    def convert(value: Any, ctx: Context) -> list[Setting]:
        if plain(value) is None:
            return []
        path, _ = llamafactory_dataset(str(value), str(ctx.get("dataset_dir", "data")))
        return [(key, path)]

    return convert


def _max_samples(value: Any, ctx: Context) -> list[Setting]:
    if plain(value) is not None and not ctx.given("dataset"):
        raise ConfigError(
            "llamafactory: max_samples applies to LLaMA-Factory's dataset; closest: cut the file for data.path"
        )
    return []


_FLASH = {
    "auto": None,
    "disabled": "eager",
    "sdpa": "sdpa",
    "fa2": "flash_attention_2",
    "fa3": "flash_attention_3",
}


def _flash_attn(value: Any, ctx: Context) -> list[Setting]:
    name = str(plain(value))
    if name not in _FLASH:
        raise ConfigError(f"llamafactory: flash_attn={name}: expected one of {', '.join(_FLASH)}")
    return [] if _FLASH[name] is None else [("model.attn_implementation", _FLASH[name])]


def _quantization_bit(value: Any, ctx: Context) -> list[Setting]:
    bits = plain(value)
    if bits is None:
        return []
    if bits != 4 or str(ctx.get("quantization_method", "bnb")) != "bnb":
        raise ConfigError(
            f"llamafactory: quantization_bit={bits} has no preftune equivalent; closest: 4 (bitsandbytes NF4)"
        )
    return [("model.load_in_4bit", True)]


def _thinking(value: Any, ctx: Context) -> list[Setting]:
    if plain(value) is False:
        raise ConfigError(
            "llamafactory: enable_thinking=false has no preftune equivalent; closest: data.chat_template with a "
            "template that leaves thinking out"
        )
    return []


def _ref_model(value: Any, ctx: Context) -> list[Setting]:
    return [] if plain(value) is None else [("reference.path", str(value)), ("reference.strategy", "copy")]


def _ref_quantization(value: Any, ctx: Context) -> list[Setting]:
    bits = plain(value)
    if bits is None:
        return []
    if bits not in (4, 8):
        raise ConfigError(
            f"llamafactory: ref_model_quantization_bit={bits} has no preftune equivalent; closest: "
            "reference.quantize=nf4 (4) or int8 (8)"
        )
    return [("reference.quantize", "nf4" if bits == 4 else "int8")]


def _pure_bf16(value: Any, ctx: Context) -> list[Setting]:
    return [("model.dtype", "bfloat16"), ("train.mixed_precision", "no")] if plain(value) is True else []


def _lf_streaming(value: Any, ctx: Context) -> list[Setting]:
    return [("data.split", "stream:train")] if plain(value) is True else []


# --------------------------------------------------------------------------- the tables

_SPEED = "speed or memory only; the numbers are the same"
_LOG = "logging only"
_EVAL = "how evaluation batches are run; preftune's evaluation metrics are its own"
_HUB = "only with push_to_hub, which is refused"
_DDP = "the launcher's and DDP's business (accelerate launch / torchrun)"
_LAUNCH = "accelerate launch --config_file examples/accelerate/<fsdp2|zero2|zero3>.yaml -m preftune train ..."

TRAINING_ARGUMENTS: dict[str, Rule] = {
    # output, length of training, batches
    "output_dir": same("train.output_dir"),
    "per_device_train_batch_size": same(
        "train.batch_size", "pairs (KTO: examples) per device per micro-batch"
    ),
    "gradient_accumulation_steps": same("train.grad_accum"),
    "num_train_epochs": same("train.epochs"),
    "max_steps": converted("train.max_steps", _max_steps, "-1 (unset) and any value <= 0 become null"),
    "learning_rate": same("train.learning_rate"),
    "lr_scheduler_type": converted(
        "train.scheduler",
        _scheduler,
        "linear, cosine; constant_with_warmup is constant (which warms up when asked); constant with a warmup is refused",
    ),
    "lr_scheduler_kwargs": refused("train.scheduler", "preftune's schedules take no arguments"),
    "warmup_steps": converted("train.warmup_steps", _warmup_steps, "a value in (0, 1) is train.warmup_ratio"),
    "optim": converted(
        "train.optimizer",
        _optim,
        "the AdamW names (adamw_torch, adamw_torch_fused, ...): adamw; adamw_8bit, adamw_bnb_8bit, "
        "paged_adamw_8bit: bitsandbytes' 8-bit AdamW; any other optimizer is refused",
    ),
    "optim_args": refused(
        "train.adam_beta1, train.adam_beta2, train.adam_epsilon", "only for other optimizers"
    ),
    "optim_target_modules": refused("", "GaLore / APOLLO only"),
    "weight_decay": same(
        "train.weight_decay", say="preftune decays every trained weight; HF exempts biases and norms"
    ),
    "adam_beta1": same("train.adam_beta1"),
    "adam_beta2": same("train.adam_beta2"),
    "adam_epsilon": same("train.adam_epsilon"),
    "max_grad_norm": converted("train.max_grad_norm", _max_grad_norm, "0 (no clipping) becomes null"),
    "label_smoothing_factor": refused(
        "objective.label_smoothing", "token-level cross-entropy smoothing, not DPO's"
    ),
    "seed": same("train.seed", say="the same seed gives preftune's own data order, not HF's sampler's"),
    "data_seed": refused("train.seed", "train.seed seeds the data order and everything else"),
    "full_determinism": ignored(
        "preftune seeds everything from train.seed; kernels stay as torch chooses", "train.seed"
    ),
    "train_sampling_strategy": converted(
        "train.shuffle",
        _sampling,
        "random: shuffle, sequential: not; group_by_length refused",
    ),
    "length_column_name": ignored("only with group_by_length, which is refused", ok=("length",)),
    "auto_find_batch_size": refused("train.batch_size and train.grad_accum", "4 x 2 equals 1 x 8 exactly"),
    # precision and memory
    "bf16": converted(
        "train.mixed_precision", _precision, "true: bf16; false: no; unset: auto (bf16 where it can)"
    ),
    "fp16": converted("train.mixed_precision", _precision, "true: fp16"),
    "bf16_full_eval": refused("model.dtype=bfloat16", "evaluation in pure bf16 changes its numbers"),
    "fp16_full_eval": refused("model.dtype=float16", "evaluation in pure fp16 changes its numbers"),
    "tf32": ignored("matmul precision switch; torch's default is kept"),
    "gradient_checkpointing": same("model.gradient_checkpointing"),
    "gradient_checkpointing_kwargs": ignored("checkpointing implementation detail"),
    "activation_checkpointing": converted(
        "model.gradient_checkpointing",
        _when_true("model.gradient_checkpointing", True),
        "true: gradient checkpointing",
    ),
    "activation_checkpointing_kwargs": ignored("checkpointing implementation detail"),
    "torch_compile": ignored(_SPEED),
    "torch_compile_backend": ignored(_SPEED),
    "torch_compile_mode": ignored(_SPEED),
    "use_liger_kernel": ignored(
        _SPEED + " (preftune's chunked log-probs bound the logits memory)", "train.logps_chunk_size"
    ),
    "liger_kernel_config": ignored(_SPEED, "train.logps_chunk_size"),
    "use_cache": ignored("training forwards never use the KV cache"),
    "neftune_noise_alpha": refused("", "NEFTune embedding noise"),
    "torch_empty_cache_steps": ignored(_SPEED),
    "average_tokens_across_devices": ignored("preftune averages per pair (per-sequence losses)", ok=(True,)),
    # logging
    "logging_strategy": converted(
        "train.log_every", _logging_strategy, "steps: logging_steps; epoch refused", ok=("steps", "no")
    ),
    "logging_steps": converted(
        "train.log_every", _steps_of("logging_steps", "train.log_every"), "a share of all steps is refused"
    ),
    "logging_first_step": ignored(_LOG),
    "log_on_each_node": ignored(_LOG, ok=(True,)),
    "logging_nan_inf_filter": ignored(
        "preftune stops (or skips, train.nonfinite) on a non-finite loss", "train.nonfinite", ok=(True,)
    ),
    "include_num_input_tokens_seen": ignored("preftune logs num_tokens always", ok=("no",)),
    "log_level": ignored(_LOG, ok=("passive",)),
    "log_level_replica": ignored(_LOG, ok=("warning",)),
    "disable_tqdm": converted(
        "train.progress", _negated("train.progress"), "train.progress = not disable_tqdm"
    ),
    "report_to": converted(
        "train.report_to", _report_to, "tensorboard, wandb, mlflow, trackio or none; others refused"
    ),
    "run_name": ignored("the trackers' run name is the output folder's"),
    "project": ignored("the trackers' project is preftune's", ok=("huggingface",)),
    "trackio_space_id": ignored("trackio runs locally", ok=("trackio",)),
    "trackio_bucket_id": ignored("trackio runs locally"),
    "trackio_static_space_id": ignored("trackio runs locally"),
    "skip_memory_metrics": ignored(_LOG, ok=(True,)),
    "debug": ignored("debug output only"),
    # evaluation
    "eval_strategy": converted(
        "train.eval_every",
        _eval_strategy,
        "steps: train.eval_every = eval_steps (or logging_steps) and, from a TRL file, the same dataset's "
        "dataset_test_split as data.eval_path / data.eval_split; epoch refused",
    ),
    "eval_steps": converted("train.eval_every", _unused_without_eval, "read with eval_strategy=steps"),
    "eval_delay": refused("train.eval_every", ok=(0,)),
    "per_device_eval_batch_size": ignored(_EVAL, ok=(8,)),
    "prediction_loss_only": ignored(_EVAL),
    "eval_on_start": refused("preftune eval on the starting model"),
    "eval_do_concat_batches": ignored(_EVAL, ok=(True,)),
    "eval_use_gather_object": ignored(_EVAL),
    "eval_accumulation_steps": ignored(_EVAL),
    "include_for_metrics": ignored(_EVAL),
    "batch_eval_metrics": ignored(_EVAL),
    "do_train": ignored("preftune's training commands always train"),
    "do_eval": ignored("evaluation follows eval_strategy"),
    "do_predict": ignored("not a training setting"),
    # checkpoints
    "save_strategy": converted(
        "train.save_every", _save_strategy, "no: train.save_every=null; epoch and best refused", ok=("steps",)
    ),
    "save_steps": converted(
        "train.save_every", _steps_of("save_steps", "train.save_every"), "a share of all steps is refused"
    ),
    "save_total_limit": same("train.save_total_limit"),
    "save_only_model": ignored(
        "preftune's checkpoints hold optimizer, schedule and RNG, for an exact resume"
    ),
    "save_on_each_node": ignored(_DDP),
    "enable_jit_checkpoint": ignored("preftune checkpoints whenever a signal stops the run"),
    "load_best_model_at_end": refused(
        "", "final/ is the last step; pick a checkpoint by eval_* in metrics.jsonl"
    ),
    "metric_for_best_model": ignored("only with load_best_model_at_end, which is refused"),
    "greater_is_better": ignored("only with load_best_model_at_end, which is refused"),
    "resume_from_checkpoint": converted(
        "train.resume", _resume, "true: the newest checkpoint in train.output_dir; a path: that checkpoint"
    ),
    "ignore_data_skip": ignored("resuming never replays batches (the data order is a seeded stream)"),
    "restore_callback_states_from_checkpoint": ignored("no callbacks"),
    "push_to_hub": refused("", "upload final/ (a save_pretrained folder) with `hf upload`"),
    "hub_token": ignored(_HUB, secret=True),
    "hub_private_repo": ignored(_HUB),
    "hub_model_id": ignored(_HUB),
    "hub_strategy": ignored(_HUB, ok=("every_save",)),
    "hub_always_push": ignored(_HUB),
    "hub_revision": ignored(_HUB),
    # data loading and launching
    "dataloader_drop_last": ignored("preftune's micro-batches are always full"),
    "dataloader_num_workers": ignored(_SPEED),
    "dataloader_pin_memory": ignored(_SPEED, ok=(True,)),
    "dataloader_persistent_workers": ignored(_SPEED),
    "dataloader_prefetch_factor": ignored(_SPEED),
    "dataloader_multiprocessing_context": ignored(_SPEED),
    "dataloader_in_order": ignored(_SPEED, ok=(True,)),
    "remove_unused_columns": ignored("preftune's readers take the fields they are told", ok=(True,)),
    "label_names": ignored("Trainer internals"),
    "use_cpu": ignored("preftune picks the device itself; CUDA_VISIBLE_DEVICES='' keeps it on the CPU"),
    "accelerator_config": refused(_LAUNCH),
    "parallelism_config": refused(_LAUNCH),
    "fsdp": refused(_LAUNCH, "FSDP2 runs through accelerate"),
    "fsdp_config": refused(_LAUNCH),
    "deepspeed": refused(_LAUNCH, "ZeRO-2/3 run through accelerate"),
    "ddp_find_unused_parameters": ignored(_DDP),
    "ddp_bucket_cap_mb": ignored(_DDP),
    "ddp_broadcast_buffers": ignored(_DDP),
    "ddp_static_graph": ignored(_DDP),
    "ddp_backend": ignored(_DDP),
    "ddp_timeout": ignored(_DDP, ok=(1800,)),
    "local_rank": ignored(_DDP, ok=(-1,)),
}
"""transformers' ``TrainingArguments``: every TRL trainer config and LLaMA-Factory inherit them."""

TRL_OWN: dict[str, Rule] = {
    # ModelConfig (the TRL command line's model flags)
    "model_name_or_path": same("model.name_or_path"),
    "model_revision": same("model.revision"),
    "dtype": same("model.dtype"),
    "attn_implementation": same("model.attn_implementation"),
    "use_peft": same("model.lora"),
    "lora_r": same("model.lora_r"),
    "lora_alpha": converted("model.lora_alpha", _lora_alpha, "with use_rslora, alpha*sqrt(r)"),
    "lora_dropout": same("model.lora_dropout"),
    "lora_target_modules": converted(
        "model.lora_target_modules",
        _not_null("model.lora_target_modules"),
        "unset: peft's per-architecture default in TRL, all-linear in preftune",
    ),
    "lora_target_parameters": refused("model.lora_target_modules"),
    "lora_modules_to_save": refused("", "a reward model's new head is trained anyway"),
    "lora_task_type": refused("", "preftune sets it by command", ok=("CAUSAL_LM", "SEQ_CLS")),
    "use_rslora": converted(
        "model.lora_alpha", _rslora, "rsLoRA is plain LoRA with lora_alpha*sqrt(r), when a whole number"
    ),
    "use_dora": refused("model.lora", "DoRA"),
    "load_in_8bit": refused("model.load_in_4bit"),
    "load_in_4bit": same("model.load_in_4bit"),
    "bnb_4bit_quant_type": refused("nf4", ok=("nf4",)),
    "use_bnb_nested_quant": ignored(
        "preftune always quantizes the quantization constants (a little less memory)"
    ),
    "bnb_4bit_quant_storage": refused("", "FSDP + QLoRA storage"),
    # ScriptArguments and dataset mixtures
    "dataset_name": converted(
        "data.path", _dataset_name, "a hub name or local folder; with dataset_config, name:config"
    ),
    "dataset_config": converted("data.path", _dataset_config, "data.path = dataset_name:dataset_config"),
    "dataset_train_split": converted("data.split", _split_of("data.split"), "stream:SPLIT when streaming"),
    "dataset_test_split": converted(
        "data.eval_split", _unused_without_eval, "read with eval_strategy=steps", ok=("test",)
    ),
    "dataset_streaming": converted("data.split", _streaming, "data.split = stream:SPLIT"),
    "ignore_bias_buffers": ignored(_DDP),
    "datasets": converted(
        "data.path", _datasets, "one entry: its path (name:config, or its one data file) and split"
    ),
    "streaming": converted("data.split", _streaming, "data.split = stream:SPLIT"),
    "test_split_size": refused("data.eval_path", "preftune makes no automatic split"),
    # the trainer configs' own fields
    "model_init_kwargs": converted(
        "model.*", _model_init_kwargs, "revision, dtype, attn_implementation, trust_remote_code"
    ),
    "trust_remote_code": same("model.trust_remote_code"),
    "router_aux_loss_coef": refused("", "MoE load-balancing loss"),
    "disable_dropout": refused("", "preftune always disables dropout in policy and reference", ok=(True,)),
    "dataset_num_proc": converted(
        "data.num_proc", _not_null("data.num_proc"), "processes that tokenize (the same ids for any number)"
    ),
    "max_length": same(
        "data.max_length",
        say="prompt + completion; TRL's RewardTrainer drops longer pairs, preftune truncates",
    ),
    "truncation_mode": refused("data.max_prompt_length (keeps a long prompt's end)", ok=("keep_start",)),
    "padding_free": converted("data.layout", _when_true("data.layout", "packed"), "true: data.layout=packed"),
    "pad_to_multiple_of": ignored("padding is masked", ok=("auto",)),
    "precompute_ref_log_probs": converted(
        "reference.strategy",
        _when_true("reference.strategy", "precomputed"),
        "true: reference.strategy=precomputed",
    ),
    "precompute_ref_batch_size": converted(
        "reference.batch_size", _not_null("reference.batch_size"), "unset: preftune's"
    ),
    "loss_type": converted(
        "objective.loss",
        _objective,
        "DPO's names are preftune's; with CPO's fields, CPO's (sigmoid: cpo, simpo: cpo_simpo, ...); SFT: nll",
    ),
    "loss_weights": converted("objective.weights", _objective, "with loss_type"),
    "ld_alpha": same("objective.ld_alpha"),
    "f_divergence_type": same("objective.f_divergence"),
    "f_alpha_divergence_coef": converted(
        "objective.f_divergence_alpha",
        _not_null("objective.f_divergence_alpha"),
        "read with f_divergence_type=alpha_divergence",
        ok=(0.5,),
    ),
    "label_smoothing": same("objective.label_smoothing"),
    "beta": same("objective.beta"),
    "use_weighting": same("objective.wpo"),
    "discopop_tau": same("objective.discopop_tau"),
    "activation_offloading": ignored(_SPEED),
    "sync_ref_model": refused(
        "preftune online (online.reference=round restarts the reference each round)", "TR-DPO"
    ),
    "ref_model_mixup_alpha": ignored("only with sync_ref_model, which is refused", ok=(0.6,)),
    "ref_model_sync_steps": ignored("only with sync_ref_model, which is refused", ok=(512,)),
    "pad_token": same("model.pad_token"),
    "chat_template_path": converted("data.chat_template", _chat_template_path, "a Jinja file"),
    "eos_token": same("model.eos_token"),
    "center_rewards_coefficient": same("rm.center_rewards_coefficient"),
    "dataset_text_field": same("data.text_field"),
    "dataset_kwargs": refused("", "preftune always prepares the dataset itself"),
    "shuffle_dataset": ignored("preftune visits a fresh seeded order every epoch", "train.shuffle"),
    "packing": refused(
        "", "SFT packing changes which tokens share a row; data.layout=packed is the DPO family's"
    ),
    "packing_strategy": ignored("only with packing, which is refused", ok=("bfd",)),
    "eval_packing": ignored("only with packing, which is refused"),
    "completion_only_loss": converted(
        "data.completion_only_loss", _not_null("data.completion_only_loss"), "unset: true"
    ),
    "assistant_only_loss": converted(
        "data.completion_only_loss",
        _when_true("data.completion_only_loss", True),
        "false trains every token of a conversation in TRL; preftune trains assistant turns unless "
        "data.completion_only_loss=false",
    ),
    "desirable_weight": same("objective.desirable_weight"),
    "undesirable_weight": same("objective.undesirable_weight"),
    "max_completion_length": refused(
        "data.max_length, data.max_prompt_length", "a completion gets max_length minus its prompt"
    ),
    "cpo_alpha": converted("objective.cpo_alpha", _not_null("objective.cpo_alpha"), "CPO's NLL weight"),
    "simpo_gamma": same("objective.simpo_gamma"),
    "alpha": same("objective.alphapo_alpha"),
    "generate_during_eval": refused("preftune eval --samples K"),
    "is_encoder_decoder": refused("", "preftune trains causal LMs"),
    "padding_value": ignored("padding is masked"),
}
"""TRL's own fields: ``ModelConfig``, ``ScriptArguments``, ``DatasetMixtureConfig`` and the
fields the trainer configs add to ``TrainingArguments``."""

TRL_LEGACY: dict[str, Rule] = {
    "max_prompt_length": same(
        "data.max_prompt_length", "TRL <= 0.28 (its default was 512; preftune's is none)"
    ),
    "max_target_length": refused("data.max_length", "encoder-decoder"),
    "rpo_alpha": converted("objective.loss", _objective, "TRL <= 0.28: sft appended with this weight"),
    "reference_free": converted(
        "objective.loss", _objective, "TRL <= 0.28: cpo, cpo_hinge, cpo_ipo with cpo_alpha 0"
    ),
    "ref_model_init_kwargs": refused("reference.path"),
    "model_adapter_name": refused("reference.strategy=adapter"),
    "ref_adapter_name": refused("reference.strategy=adapter"),
    "force_use_ref_model": converted(
        "reference.strategy", _when_true("reference.strategy", "copy"), "true: reference.strategy=copy"
    ),
    "use_logits_to_keep": ignored(_SPEED),
    "label_pad_token_id": ignored("padding is masked"),
    "tools": refused("", "put the tool schemas in the records' messages"),
    "use_liger_loss": ignored(_SPEED, "train.logps_chunk_size"),
    "base_model_attribute_name": ignored(_SPEED),
    "torch_dtype": same("model.dtype", "ModelConfig <= 0.26"),
    "max_seq_length": same("data.max_length", "SFTConfig <= 0.19"),
    "gradient_checkpointing_use_reentrant": ignored("checkpointing implementation detail"),
    "warmup_ratio": same("train.warmup_ratio", "transformers 4"),
    "evaluation_strategy": converted(
        "train.eval_every", _eval_strategy, "transformers < 4.46's eval_strategy"
    ),
    "logging_dir": ignored("tracker logs go under train.output_dir"),
    "overwrite_output_dir": ignored(
        "never read by HF's Trainer; preftune's train.overwrite deletes earlier checkpoints, so it is set only by you",
        "train.overwrite",
    ),
    "save_safetensors": ignored("preftune always writes safetensors", ok=(True,)),
    "no_cuda": ignored("preftune picks the device itself; CUDA_VISIBLE_DEVICES='' keeps it on the CPU"),
    "per_gpu_train_batch_size": same("train.batch_size"),
    "per_gpu_eval_batch_size": ignored(_EVAL),
    "push_to_hub_model_id": ignored(_HUB),
    "push_to_hub_organization": ignored(_HUB),
    "push_to_hub_token": ignored(_HUB, secret=True),
    "include_tokens_per_second": ignored("preftune logs tokens_per_second always"),
    "fp16_backend": ignored(_SPEED, ok=("auto",)),
    "half_precision_backend": ignored(_SPEED, ok=("auto",)),
}
"""Names of TRL <= 0.28 and transformers 4 that users' files still hold."""

TRL_CLI: dict[str, Rule] = {
    "env": refused("set them in the shell: NAME=value preftune train ...", "TRL's launcher exports them"),
    "accelerate_config": refused(_LAUNCH, "TRL's launcher"),
    "num_processes": refused("accelerate launch --num_processes N -m preftune train ...", "TRL's launcher"),
    "num_machines": refused("accelerate launch --num_machines N -m preftune train ...", "TRL's launcher"),
    "main_process_port": refused(
        "accelerate launch --main_process_port P -m preftune train ...", "TRL's launcher"
    ),
    "mixed_precision": refused("train.mixed_precision", "TRL's launcher"),
    "config_file": refused(_LAUNCH, "TRL's launcher"),
}
"""Keys ``trl <command>`` passes to ``accelerate launch``, not to a dataclass."""

TRL: dict[str, Rule] = {**TRAINING_ARGUMENTS, **TRL_OWN, **TRL_LEGACY, **TRL_CLI}

_MM = "multimodal preprocessing; preftune trains on text"
_EXPORT = "llamafactory-cli export only"
_INFER = "LLaMA-Factory's inference engines"
_PPO = "PPO only (stage ppo is refused; preftune ppo has its own config)"


def _only_with(flag: str) -> Rule:
    return ignored(f"only with {flag}, which is refused")


LLAMAFACTORY_OWN: dict[str, Rule] = {
    # ModelArguments
    "model_name_or_path": same("model.name_or_path"),
    "adapter_name_or_path": refused(
        "model.name_or_path", "merge the adapter first (llamafactory-cli export)"
    ),
    "adapter_folder": refused("model.name_or_path", "merge the adapter first"),
    "cache_dir": ignored("downloads go to the Hugging Face cache (HF_HOME)"),
    "use_fast_tokenizer": refused("", "preftune loads the fast tokenizer", ok=(True,)),
    "resize_vocab": refused("", "no vocabulary resizing"),
    "split_special_tokens": refused("", "tokenization would differ"),
    "add_tokens": refused("", "no new tokens"),
    "add_special_tokens": refused("", "no new tokens"),
    "new_special_tokens_config": refused("", "no new tokens"),
    "init_special_tokens": ignored("only with new tokens, which are refused", ok=("noise_init",)),
    "model_revision": same("model.revision"),
    "low_cpu_mem_usage": ignored("loading detail", ok=(True,)),
    "rope_scaling": refused("", "use a model whose config carries it"),
    "flash_attn": converted(
        "model.attn_implementation",
        _flash_attn,
        "disabled: eager, sdpa, fa2/fa3: flash_attention_2/3",
        ok=("auto",),
    ),
    "shift_attn": refused("", "LongLoRA's shifted sparse attention"),
    "mixture_of_depths": refused(""),
    "use_unsloth": ignored(_SPEED),
    "use_unsloth_gc": converted(
        "model.gradient_checkpointing",
        _when_true("model.gradient_checkpointing", True),
        "true: gradient checkpointing",
    ),
    "enable_liger_kernel": ignored(_SPEED, "train.logps_chunk_size"),
    "moe_aux_loss_coef": refused("", "MoE load-balancing loss"),
    "disable_gradient_checkpointing": converted(
        "model.gradient_checkpointing",
        _negated("model.gradient_checkpointing"),
        "model.gradient_checkpointing = not disable_gradient_checkpointing (LLaMA-Factory checkpoints by default)",
    ),
    "use_reentrant_gc": ignored("checkpointing implementation detail", ok=(True,)),
    "upcast_layernorm": refused("model.dtype=float32"),
    "upcast_lmhead_output": ignored("preftune computes log-softmax in float32 anyway"),
    "train_from_scratch": refused(""),
    **each("infer_backend offload_folder use_kv_cache use_v1_kernels infer_dtype", ignored(_INFER)),
    **each(
        "hf_hub_token ms_hub_token om_hub_token",
        ignored("preftune uses the usual hub login (HF_TOKEN)", secret=True),
    ),
    "print_param_status": ignored("debug output"),
    "trust_remote_code": same("model.trust_remote_code"),
    "quantization_method": converted("model.load_in_4bit", _quantization_bit, "bnb only", ok=("bnb",)),
    "quantization_bit": converted("model.load_in_4bit", _quantization_bit, "4 with bnb: model.load_in_4bit"),
    "quantization_type": refused("nf4", ok=("nf4",)),
    "double_quantization": ignored("preftune always quantizes the quantization constants", ok=(True,)),
    "quantization_device_map": ignored(_INFER),
    **each(
        "image_max_pixels image_min_pixels image_do_pan_and_scan crop_to_patches video_max_pixels "
        "video_min_pixels video_fps video_maxlen use_audio_in_video audio_sampling_rate",
        ignored(_MM, ok=(589824, 1024, 65536, 256, 2.0, 128, 16000)),
    ),
    **each(
        "export_dir export_size export_device export_quantization_bit export_quantization_dataset "
        "export_quantization_nsamples export_quantization_maxlen export_legacy_format export_hub_model_id",
        ignored(_EXPORT, ok=(5, "cpu", 128, 1024)),
    ),
    **each(
        "vllm_maxlen vllm_gpu_util vllm_enforce_eager vllm_max_lora_rank vllm_config sglang_maxlen "
        "sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend",
        ignored(_INFER, ok=(4096, 0.7, 32, 1, "triton")),
    ),
    "use_kt": refused("", "KTransformers"),
    **each(
        "kt_cpu_activation kt_weight_path kt_non_expert_weight_path kt_expert_checkpoint_path "
        "kt_use_lora_experts kt_lora_expert_num kt_lora_expert_intermediate_size",
        _only_with("use_kt"),
    ),
    **each(
        "compute_dtype device_map model_max_length block_diag_attn",
        ignored("derived by LLaMA-Factory itself"),
    ),
    # DataArguments
    "template": converted(
        "data.chat_template",
        lambda value, ctx: [],
        "preftune renders with the tokenizer's own chat template (data.chat_template for one without)",
    ),
    "dataset": converted(
        "data.path", _lf_dataset("data.path"), "an entry of dataset_info.json, its records converted"
    ),
    "eval_dataset": converted("data.eval_path", _lf_dataset("data.eval_path"), "as dataset"),
    "dataset_dir": converted("data.path", lambda value, ctx: [], "where dataset_info.json is", ok=("data",)),
    "media_dir": refused("", _MM),
    "cutoff_len": same(
        "data.max_length", say="preftune keeps a completion's start and drops a pair whose prompt fills it"
    ),
    "train_on_prompt": converted(
        "data.completion_only_loss",
        _negated("data.completion_only_loss"),
        "data.completion_only_loss = not train_on_prompt",
    ),
    "mask_history": refused("", "preftune trains on every assistant turn"),
    "streaming": converted("data.split", _lf_streaming, "data.split = stream:train"),
    "buffer_size": ignored("only with streaming's shuffle", ok=(16384,)),
    "mix_strategy": ignored("only with several datasets, which are refused", ok=("concat",)),
    "interleave_probs": refused("", "several datasets"),
    "overwrite_cache": ignored(
        "preftune's tokenized store is keyed by everything that decides the ids, so it is never stale "
        "(data.cache=false tokenizes afresh)",
        "data.cache",
    ),
    "preprocessing_batch_size": ignored(_SPEED, ok=(1000,)),
    "preprocessing_num_workers": converted(
        "data.num_proc", _not_null("data.num_proc"), "processes that tokenize (the same ids for any number)"
    ),
    "max_samples": converted("data.path", _max_samples, "the first N records of the dataset, as it is read"),
    "eval_num_beams": ignored("generation at predict time"),
    "ignore_pad_token_for_loss": ignored("padding is masked", ok=(True,)),
    "val_size": refused("data.eval_path", "preftune makes no automatic split", ok=(0.0, 0)),
    "eval_on_each_dataset": ignored("only with several datasets, which are refused"),
    "packing": refused("", "SFT packing changes which tokens share a row"),
    "neat_packing": refused("", "SFT packing"),
    "tool_format": refused("", "put the tool schemas in the records' messages"),
    "default_system": refused("data.chat_template", "put a system turn in the records"),
    "enable_thinking": converted(
        "data.chat_template", _thinking, "true: the template's own behaviour", ok=(True,)
    ),
    "preserve_thinking": refused(""),
    "tokenized_path": refused("", "preftune tokenizes itself"),
    "data_shared_file_system": ignored(_DDP),
    # FinetuningArguments
    **each(
        "freeze_trainable_layers freeze_trainable_modules freeze_extra_modules",
        ignored("only with finetuning_type=freeze, which is refused", ok=(2, "all")),
    ),
    "additional_target": refused("", "modules trained fully beside LoRA"),
    "lora_alpha": converted(
        "model.lora_alpha", _lora_alpha, "unset: twice lora_rank; with use_rslora, alpha*sqrt(r)"
    ),
    "lora_dropout": same("model.lora_dropout"),
    "lora_rank": same("model.lora_r"),
    "lora_target": converted("model.lora_target_modules", _lora_target, "all: all-linear; a,b: [a, b]"),
    "loraplus_lr_ratio": refused("", "LoRA+"),
    "loraplus_lr_embedding": _only_with("loraplus_lr_ratio"),
    "use_rslora": converted(
        "model.lora_alpha", _rslora, "rsLoRA is plain LoRA with lora_alpha*sqrt(r), when a whole number"
    ),
    "use_dora": refused("model.lora", "DoRA"),
    "pissa_init": refused("", "PiSSA initialisation"),
    "pissa_iter": _only_with("pissa_init"),
    "pissa_convert": _only_with("pissa_init"),
    "create_new_adapter": ignored("only with adapter_name_or_path, which is refused"),
    **each(
        "module_dropout oft_rank oft_block_size oft_target",
        ignored("only with finetuning_type=oft, which is refused", ok=(32, "all")),
    ),
    "pref_beta": same("objective.beta"),
    "pref_ftx": converted("objective.loss", _pref_loss, "> 0: sft appended with this weight"),
    "pref_bco_weight": refused("objective.loss=[sigmoid, bco_pair] with weights", "BCO's running-mean shift"),
    "pref_loss": converted("objective.loss", _pref_loss, "sigmoid, hinge, ipo, orpo, simpo"),
    "dpo_label_smoothing": same("objective.label_smoothing"),
    "kto_chosen_weight": same("objective.desirable_weight"),
    "kto_rejected_weight": same("objective.undesirable_weight"),
    "simpo_gamma": same("objective.simpo_gamma"),
    **each(
        "ppo_buffer_size ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards",
        ignored(_PPO, ok=(1, 4, 6.0)),
    ),
    "ref_model": converted("reference.path", _ref_model, "reference.path with reference.strategy=copy"),
    "ref_model_adapters": refused("reference.path", "merge the adapters first"),
    "ref_model_quantization_bit": converted(
        "reference.quantize", _ref_quantization, "4: nf4, 8: int8 (bitsandbytes), for a ref_model"
    ),
    **each(
        "reward_model reward_model_adapters reward_model_quantization_bit reward_model_type",
        ignored(_PPO, ok=("lora",)),
    ),
    "ld_alpha": refused("objective.ld_alpha", "LLaMA-Factory weights only the policy's tail tokens"),
    "use_galore": refused("", "optimizer"),
    **each(
        "galore_target galore_rank galore_update_interval galore_scale galore_proj_type galore_layerwise",
        _only_with("use_galore"),
    ),
    "use_apollo": refused("", "optimizer"),
    **each(
        "apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj apollo_proj_type "
        "apollo_scale_type apollo_layerwise apollo_scale_front",
        _only_with("use_apollo"),
    ),
    "use_badam": refused("", "optimizer"),
    **each(
        "badam_mode badam_start_block badam_switch_mode badam_switch_interval badam_update_ratio "
        "badam_mask_mode badam_verbose",
        _only_with("use_badam"),
    ),
    "use_swanlab": refused("train.report_to", "SwanLab"),
    **each(
        "swanlab_project swanlab_workspace swanlab_run_name swanlab_mode swanlab_logdir",
        _only_with("use_swanlab"),
    ),
    **each(
        "swanlab_api_key swanlab_lark_webhook_url swanlab_lark_secret",
        ignored("only with use_swanlab, which is refused", secret=True),
    ),
    "pure_bf16": converted("model.dtype", _pure_bf16, "true: model.dtype=bfloat16, train.mixed_precision=no"),
    "stage": converted(
        "objective.loss",
        _stage,
        "dpo: preftune train, kto: train with loss kto, rm: rm train, sft: sft",
        ok=("dpo", "rm", "sft"),
    ),
    "finetuning_type": converted("model.lora", _finetuning_type, "lora: model.lora=true, full: false"),
    **each("use_llama_pro use_adam_mini use_mca use_megatron_bridge use_muon", refused("")),
    **each("megatron_bridge_args", _only_with("use_megatron_bridge")),
    "use_hyper_parallel": refused(_LAUNCH),
    **each("hyper_parallel_args hyper_parallel_cp_size", _only_with("use_hyper_parallel")),
    **each("use_dft_loss use_asft_loss use_eaft_loss", refused("", "an SFT loss variant")),
    "asft_alpha": _only_with("use_asft_loss"),
    "eaft_alpha": _only_with("use_eaft_loss"),
    **each("freeze_vision_tower freeze_multi_modal_projector", ignored(_MM, ok=(True,))),
    "freeze_language_model": refused(""),
    "compute_accuracy": ignored("SFT's token accuracy at evaluation"),
    "disable_shuffling": converted(
        "train.shuffle", _negated("train.shuffle"), "train.shuffle = not disable_shuffling"
    ),
    "early_stopping_steps": refused("train.max_steps"),
    "plot_loss": ignored("preftune writes metrics.jsonl and tracker logs"),
    "include_effective_tokens_per_second": ignored("preftune logs tokens_per_second always"),
    # LLaMA-Factory's TrainingArguments additions
    "ray_num_workers": refused("accelerate launch --num_processes N", ok=(1,)),
    **each("ray_init_kwargs master_addr master_port", ignored(_DDP)),
    **each(
        "enable_torch_profiler profiler_output_dir profiler_wait_steps profiler_warmup_steps profiler_active_steps "
        "profiler_repeat profiler_record_shapes profiler_profile_memory profiler_with_stack profile_modules",
        ignored("profiler only", ok=(1, 3)),
    ),
    "fp8": refused("train.mixed_precision=bf16"),
    **each(
        "fp8_backend fp8_enable_fsdp_float8_all_gather",
        ignored("only with fp8, which is refused", ok=("auto",)),
    ),
    "overwrite_output_dir": TRL_LEGACY["overwrite_output_dir"],
    # GeneratingArguments: PPO's sampling and predictions, not training
    **each(
        "do_sample temperature top_p top_k max_new_tokens length_penalty skip_special_tokens",
        ignored("generation at predict time or in PPO", ok=(True, 0.95, 0.7, 50, 1024, 1.0)),
    ),
    "max_length": ignored(
        "LLaMA-Factory's generation length; the training length is cutoff_len", "data.max_length"
    ),
    "num_beams": refused("", "beam search", ok=(1,)),
    "repetition_penalty": refused("", "generation only", ok=(1.0,)),
    # Seq2SeqTrainingArguments
    "sortish_sampler": ignored("a seq2seq sampler"),
    "predict_with_generate": refused("preftune eval --samples K"),
    **each("generation_max_length generation_num_beams generation_config", ignored("prediction only")),
    "warmup_ratio": same("train.warmup_ratio"),
}
"""LLaMA-Factory's own arguments (``hparams/{model,data,finetuning,training,generating}_args.py``)
and the transformers 4 names its examples use."""

LLAMAFACTORY: dict[str, Rule] = {**TRAINING_ARGUMENTS, **LLAMAFACTORY_OWN}

TABLES: dict[str, dict[str, Rule]] = {"trl": TRL, "llamafactory": LLAMAFACTORY}

DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "trl": {
        "*": {"num_train_epochs": 3.0, "gradient_checkpointing": True, "lora_dropout": 0.05},
        "sft": {"learning_rate": 2e-5},
        "rm train": {"learning_rate": 1e-4},
    },
    "llamafactory": {
        "*": {
            "num_train_epochs": 3.0,
            "learning_rate": 5e-5,
            "finetuning_type": "lora",
            "lora_rank": 8,
            "lora_alpha": None,
            "lora_target": "all",
            "cutoff_len": 2048,
            "disable_gradient_checkpointing": False,
            "bf16": False,
        },
        "train": {"pref_beta": 0.1, "pref_loss": "sigmoid"},
    },
}
"""The source's defaults where they differ from preftune's and change what is trained: a file
written for TRL or LLaMA-Factory runs as it runs there. They apply to a file, not to flags."""


def source_defaults(source: str, command: str | None) -> dict[str, Any]:
    table = DEFAULTS[source]
    return {**table["*"], **table.get(command or "train", {})}
