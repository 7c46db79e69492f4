"""``final/README.md``: the model card every recipe writes beside its final weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def model_card(output_dir: Path, config: Any, history: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    """``final/README.md``: what this model is, what it was trained on and how, and how it ended.

    ``extra`` holds the recipe's own lines (``kind``, ``objective``, …; ``training data`` replaces
    ``data.path``: PPO trains on prompts).
    """
    cfg = config.train
    last_train: dict[str, Any] = next((h for h in reversed(history) if "loss" in h), {})
    last_eval: dict[str, Any] = next((h for h in reversed(history) if "eval_loss" in h), {})
    lines = [
        "---",
        "library_name: transformers",
        "tags: [preftune, " + str(extra.get("kind", "preference-training")) + "]",
        f"base_model: {config.model.name_or_path or 'unknown'}",
        "---",
        "",
        f"# {output_dir.name or 'model'}",
        "",
        f"Trained with preftune ({extra.get('kind', 'preference training')}).",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {config.model.name_or_path or '(a model object passed in Python)'} |",
        f"| training data | {extra.get('training data') or config.data.path or '(records passed in Python)'} |",
        *(f"| {key} | {value} |" for key, value in extra.items() if key not in ("kind", "training data")),
        f"| steps | {last_train.get('step', 0)} |",
        f"| learning rate | {cfg.learning_rate} ({cfg.scheduler}, warmup {cfg.warmup_steps or cfg.warmup_ratio}) |",
        f"| batch | {cfg.batch_size} per device × {cfg.grad_accum} accumulation |",
        f"| LoRA | {'r=' + str(config.model.lora_r) if config.model.lora else 'no'} |",
        f"| seed | {cfg.seed} |",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for name, value in {**last_train, **last_eval}.items():
        if name != "step" and isinstance(value, int | float):
            lines.append(f"| {name} | {value:.6g} |")
    lines += [
        "",
        "The full configuration is in `../config.json`; every logged step in `../metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)
