"""Atomic checkpoints: a ``save_pretrained`` folder plus optimizer, scheduler, RNG and data position.

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash
leaves either the whole checkpoint or none; a stray temporary folder is removed at the
next start. ``checkpoint-N`` folders (named as every Hugging Face tool names them; the older
``checkpoint-0000040`` names are still read) load with ``AutoModelForCausalLM.from_pretrained``
as they are (LoRA runs hold the adapter, which transformers loads on top of its base model
when peft is installed).

Two state files: ``trainer_state.json`` in the Hugging Face Trainer's own schema (``global_step``,
``epoch``, ``max_steps``, ``log_history``, …: what tools that read HF checkpoints look for, and
exactly what ``TrainerState.load_from_json`` accepts), and ``preftune_state.json``, preftune's own
(the data position, the run's geometry, the digest of the starting weights, a recipe's state),
written last: a folder holding it is complete. HF's loader builds its dataclass from every key
of its file and refuses any other, so preftune's keys cannot ride along in it.

Nothing read back from a checkpoint can run code: weights are safetensors, the RNG state is
JSON plus safetensors, and the optimizer and scheduler states are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
The exception is a DeepSpeed run's ``optimizer/`` folder (one file per process, in DeepSpeed's
own format), which only DeepSpeed reads back, as it wrote it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.files import json_safe
from ..errors import CheckpointError, ConfigError
from ..model.load import is_peft
from ..model.quantize import is_quantized, save_dequantized

STATE_FILE = "preftune_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
"""The Hugging Face Trainer's file; before ``preftune_state.json`` existed, preftune's state was here."""
OPTIMIZER_FILE = "optimizer.pt"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.rpartition("-")[2])


def _save_rng_state(folder: Path) -> None:
    """Python's and NumPy's generators as JSON, torch's (CPU and CUDA) as safetensors: no pickle."""
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
    }
    (folder / "rng.json").write_text(json.dumps(plain))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(folder / "rng.safetensors"))


def _load_rng_state(folder: Path) -> None:
    from safetensors.torch import load_file

    plain = json.loads((folder / "rng.json").read_text())
    version, internal, gauss = plain["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    tensors = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@dataclass
class CheckpointContents:
    """What one checkpoint holds, beside its step."""

    model: Any
    """Saved at the top: the folder loads with ``from_pretrained`` as is."""
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: dict[str, Any]
    """``preftune_state.json`` (the step is added): the data position, the run's geometry, a
    recipe's own state (PPO's β)."""
    extra_models: dict[str, Any] = field(default_factory=dict)
    """Each saved in a subfolder of its name (PPO's critic in ``value/``)."""
    weights: dict[str, torch.Tensor] | None = None
    """The gathered weights of a sharded model (None: the model's own)."""
    optimizer_state: dict[str, Any] | Path | None = None
    """The gathered state of a sharded optimizer, or a folder of DeepSpeed's files, one per process
    (moved in as ``optimizer/``); None: the optimizer's own ``state_dict``."""
    trainer_state: dict[str, Any] | None = None
    """``trainer_state.json`` in the Hugging Face Trainer's schema (None: not written)."""


def save_checkpoint(
    output_dir: Path, step: int, contents: CheckpointContents, keep: int | None = None
) -> Path:
    """``checkpoint-N`` (written whole or not at all), keeping the newest ``keep`` checkpoints."""
    final = output_dir / checkpoint_name(step)
    tmp = _atomic_dir(final)
    try:
        contents.model.save_pretrained(tmp, state_dict=contents.weights, safe_serialization=True)
        for name, extra in contents.extra_models.items():
            extra.save_pretrained(tmp / name, safe_serialization=True)
        contents.tokenizer.save_pretrained(tmp)
        moments = contents.optimizer_state
        if isinstance(moments, Path):
            os.replace(moments, tmp / "optimizer")
        else:
            torch.save(contents.optimizer.state_dict() if moments is None else moments, tmp / OPTIMIZER_FILE)
        torch.save(contents.scheduler.state_dict(), tmp / "scheduler.pt")
        _save_rng_state(tmp)
        if contents.trainer_state is not None:
            # Strict JSON, as metrics.jsonl: a non-finite value logged (PPO's grad_norm) becomes null.
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(json_safe(contents.trainer_state), indent=2))
        # Written last: a folder with this file is complete.
        (tmp / STATE_FILE).write_text(json.dumps({**contents.state, "step": step}, indent=2))
        _publish(tmp, final)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(err, final, output_dir) from None
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_error(err: Exception, target: Path, output_dir: Path) -> CheckpointError:
    """A failed write, said plainly: a full disk names the checkpoint that is still good."""
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC
    full = full or "unexpected pos" in str(err) or "No space left" in str(err)  # torch's zip writer
    found = list_checkpoints(output_dir)
    kept = f"the last good checkpoint, {found[-1].name}, is kept" if found else "no earlier checkpoint exists"
    if full:
        return CheckpointError(f"{target}: the disk is full; nothing half-written was left, and {kept}")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    return CheckpointError(f"{target}: cannot write ({reason}); {kept}")


def check_free_space(output_dir: Path, needed: int) -> None:
    """Room for one checkpoint, before the first step rather than at the first save."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(
            f"train.output_dir: {output_dir} has {free / 2**30:.2f} GiB free; one checkpoint needs about "
            f"{needed / 2**30:.2f} GiB"
        )


def recover_stray(output_dir: Path) -> None:
    """After a crash: drop half-written ``.tmp-*`` folders, and put back a folder that was being
    replaced (``.old-X`` without ``X``)."""
    if not output_dir.is_dir():
        return
    for path in output_dir.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for path in output_dir.glob(".old-*"):
        original = output_dir / path.name[len(".old-") :]
        if original.exists():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.replace(path, original)


def plan_output_dir(output_dir: Path, resume: bool | str, overwrite: bool) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from (if any), and what of an earlier run a fresh run will
    remove — later, once its models have loaded: a run that fails to start harms nothing.

    ``resume``: True for the latest checkpoint in ``output_dir``, or the path of one checkpoint. A
    fresh run never mixes into an earlier run's folder: it stops with a message, or with
    ``overwrite`` replaces it.
    """
    found = list_checkpoints(output_dir)
    if isinstance(resume, str):
        return _plan_named(output_dir, Path(resume), found, overwrite)
    if resume:
        return (found[-1] if found else None), []
    return None, _plan_fresh(output_dir, found, overwrite)


def _plan_fresh(output_dir: Path, found: list[Path], overwrite: bool) -> list[Path]:
    earlier = [*found, *(p for p in (output_dir / "final", output_dir / "tensorboard") if p.exists())]
    has_run = found or (output_dir / "final").exists()
    if has_run and not overwrite:
        what = found[-1].name if found else "final/"
        raise ConfigError(
            f"train.output_dir: {output_dir} holds an earlier run ({what}); "
            "add --resume to continue it, or --set train.overwrite=true to start over"
        )
    return earlier


def _plan_named(output_dir: Path, path: Path, found: list[Path], overwrite: bool) -> tuple[Path, list[Path]]:
    """``--resume PATH``: that checkpoint. In this run's folder, any later checkpoint (and the
    ``final/`` after it) belongs to the states being replaced: ``overwrite`` must say so. Elsewhere,
    the run continues into ``output_dir`` as a fresh run would start there."""
    check_resumable(path)
    if path.resolve().parent != output_dir.resolve():
        return path, _plan_fresh(output_dir, found, overwrite)
    later = [p for p in found if checkpoint_step(p) > checkpoint_step(path)]
    if later and (output_dir / "final").exists():
        later.append(output_dir / "final")
    if later and not overwrite:
        names = ", ".join(p.name for p in later)
        raise ConfigError(
            f"train.resume: {output_dir} holds {names} after {path.name}; resuming from {path.name} "
            "replaces them: add --set train.overwrite=true to do so, or --resume alone for the latest"
        )
    return path, later


def is_trainer_checkpoint(path: Path) -> bool:
    """A checkpoint the Hugging Face Trainer wrote (TRL's trainers included)."""
    return not (path / STATE_FILE).is_file() and (
        (path / "training_args.bin").is_file() or any(path.glob("rng_state*.pth"))
    )


def check_resumable(path: Path) -> None:
    """``path`` is a complete preftune checkpoint; a Hugging Face Trainer's is refused with the
    way to start from its weights."""
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path}: no such checkpoint folder")
    if is_trainer_checkpoint(path):
        raise CheckpointError(
            f"{path}: a checkpoint written by the Hugging Face Trainer (TRL); preftune cannot continue its "
            f"optimizer, schedule and data order. Start a new run from its weights instead: --model {path}"
        )
    if read_state(path) is None:
        inside = list_checkpoints(path)
        hint = f" (it holds {', '.join(p.name for p in inside)}: name one)" if inside else ""
        raise ConfigError(f"train.resume: {path} is not a complete preftune checkpoint{hint}")


def clear_previous_run(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint's own state, or None when ``path`` is no complete preftune checkpoint. Reads
    ``preftune_state.json``, or the ``trainer_state.json`` of a checkpoint written before it
    existed (preftune's keys; HF's file has ``global_step``, never ``step``)."""
    for name in (STATE_FILE, TRAINER_STATE_FILE):
        file = path / name
        if file.is_file():
            try:
                state = json.loads(file.read_text())
            except (ValueError, OSError):
                return None
            if isinstance(state, dict) and "step" in state:
                return state
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in ``output_dir``, by step (``checkpoint-40`` and ``checkpoint-0000040`` alike)."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.name.rpartition("-")[2].isdigit() and read_state(p) is not None
    ]
    return sorted(found, key=checkpoint_step)


def _load_full_weights(path: Path, model: Any) -> None:
    """Load a ``save_pretrained`` folder's weights into ``model`` in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    # The model's files only: a checkpoint's rng.safetensors beside them is no weight.
    files = sorted(path.glob("model*.safetensors"))
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), "pt") as handle:
            names.update(handle.keys())
    state = model.state_dict()
    if names - set(state):
        # The hub layout differs from the live one (transformers 5 fuses MoE experts, for
        # one): let transformers convert it, and refuse anything it had to invent.
        loaded_and_info: Any = type(model).from_pretrained(
            path, dtype=next(model.parameters()).dtype, output_loading_info=True
        )
        loaded, info = loaded_and_info
        problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
            {"errors": info["error_msgs"]} if info.get("error_msgs") else {}
        )
        if problems:
            raise CheckpointError(f"{path}: weights do not match the model ({problems})")
        weights = loaded.state_dict()
    else:
        weights = {}
        for file in files:
            weights.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # save_pretrained leaves out tied copies (lm_head = embed_tokens); they share storage.
    stored = {state[name].data_ptr() for name in weights if name in state}
    untied = [name for name in missing if state[name].data_ptr() not in stored]
    if unexpected or untied:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {untied}, unexpected {unexpected})"
        )


def load_weights(path: Path, model: Any) -> None:
    """A checkpoint's weights (or LoRA adapter) into ``model``, in place."""
    from safetensors.torch import load_file

    try:
        if is_peft(model):
            from peft import set_peft_model_state_dict

            adapter = load_file(str(path / "adapter_model.safetensors"))
            result: Any = set_peft_model_state_dict(model, adapter)
            # LoRA matrices, plus the whole modules peft trains beside them (a reward model's head).
            expected = sum(
                "lora_" in name or ".modules_to_save." in name for name, _ in model.named_parameters()
            )
            if result.unexpected_keys or len(adapter) != expected:
                raise CheckpointError(
                    f"{path}: its adapter does not fit this model's LoRA layers ({len(adapter)} tensors for "
                    f"{expected}; unexpected {list(result.unexpected_keys)[:3]}); use the same model.lora_* settings"
                )
        else:
            _load_full_weights(path, model)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt or foreign files: name the folder, not a torch internals trace
        raise CheckpointError(
            f"{path}: cannot resume from this checkpoint ({type(err).__name__}: {err})"
        ) from None


def load_models(path: Path, model: Any, extra_models: dict[str, Any]) -> None:
    """A checkpoint's weights into ``model`` and each of ``extra_models`` (from its subfolder), in place."""
    load_weights(path, model)
    for name, extra in extra_models.items():
        load_weights(path / name, extra)


def load_checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    load_optimizer: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the trainer state.

    ``model=None`` leaves the weights (the harness loads them before sharding, with
    :func:`load_models`); ``load_optimizer(path)`` puts the optimizer state back (default: the
    optimizer's own ``load_state_dict`` of :func:`read_optimizer_file`).
    """
    if model is not None:
        load_weights(path, model)
    try:
        if load_optimizer is None:
            optimizer.load_state_dict(read_optimizer_file(path))
        else:
            load_optimizer(path)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        _load_rng_state(path)
        state = read_state(path)
        if state is None:
            raise ValueError(f"no readable {STATE_FILE}")
        return state
    except CheckpointError:
        raise
    except Exception as err:  # corrupt or foreign files: name the folder, not a torch internals trace
        raise CheckpointError(
            f"{path}: cannot resume from this checkpoint ({type(err).__name__}: {err})"
        ) from None


def _merged_state_dict(base: Any) -> dict[str, torch.Tensor]:
    """The base model's weights with every active LoRA delta added, built on the CPU one layer at
    a time: the training device never holds a second copy of the model."""
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        # A module trained whole beside the adapters (a reward head) replaces its original.
        if "lora_" in name or ".original_module." in name:
            continue
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))
        merged[name] = tensor.detach().cpu()
    layers: list[tuple[str, Any]] = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        weight = layer.get_base_layer().weight.detach()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                weight = weight + layer.get_delta_weight(adapter).detach()
        merged[f"{name}.weight"] = weight.cpu()
    return merged


def read_optimizer_file(path: Path) -> Any:
    """The optimizer state a checkpoint holds whole (``optimizer.pt``)."""
    if not (path / OPTIMIZER_FILE).is_file() and (path / "optimizer").is_dir():
        raise CheckpointError(
            f"{path}: its optimizer state was written by DeepSpeed (optimizer/); resume with the accelerate "
            "config the run was started with"
        )
    return torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def save_final(
    output_dir: Path,
    model: Any,
    tokenizer: Any,
    card: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``output_dir/final``: full weights that any transformers/vLLM loader takes as is.

    LoRA adapters are merged into a copy (the live model keeps its adapters). A bitsandbytes model
    (QLoRA's 4-bit base) is saved dequantized to the dtype it was loaded in, LoRA merged, as a
    plain model, with the adapter itself in ``adapter/`` (for ``PeftModel.from_pretrained`` on the
    quantized base, as QLoRA tools hand it out; not at the top, where transformers would take it
    for the folder's model). ``weights``: the gathered weights of a sharded model.
    """
    final = output_dir / "final"
    tmp = _atomic_dir(final)
    if is_quantized(model):
        save_dequantized(model, tmp)
        if is_peft(model):
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
    elif is_peft(model):
        base = model.get_base_model()
        base.save_pretrained(tmp, state_dict=_merged_state_dict(base), safe_serialization=True)
    else:
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if card is not None:
        (tmp / "README.md").write_text(card, encoding="utf-8")
    _publish(tmp, final)
    return final
