"""Atomic checkpoints: a ``save_pretrained`` folder plus optimizer, scheduler, RNG and data position.

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash
leaves either the whole checkpoint or none. ``checkpoint-<step>`` folders load with
``AutoModelForCausalLM.from_pretrained`` as they are (LoRA runs hold the adapter, which
transformers loads on top of its base model when peft is installed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import is_peft

STATE_FILE = "trainer_state.json"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    final = output_dir / f"checkpoint-{step:07d}"
    tmp = _atomic_dir(final)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    # Written last: a folder with this file is complete.
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    _publish(tmp, final)
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``path``; returns the trainer state."""
    from safetensors.torch import load_file

    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    else:
        weights: dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(file)))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {name for name in missing if "lm_head" in name or "embed" in name}
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"{path}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})"
            )
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu"))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def save_final(output_dir: Path, model: Any, tokenizer: Any) -> Path:
    """``output_dir/final``: full weights (LoRA merged) that any transformers/vLLM loader takes as is."""
    final = output_dir / "final"
    tmp = _atomic_dir(final)
    if is_peft(model):
        model = model.merge_and_unload()  # type: ignore[operator]
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, final)
    return final
