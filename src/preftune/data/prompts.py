"""Prompts for the recipes that sample (online DPO, PPO): any file ``train`` reads whose records
have a ``prompt`` field, a string or chat messages; every bad record reported together. A record's
``tools`` and ``chat_template_kwargs`` reach the chat template, so rollouts start from the prompt
training on the same record would see."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from . import window
from .records import Text, check_text, check_turns, is_empty, template_kwargs
from .report import Findings
from .scan import Scan
from .tokenize import Encoder

MAX_ERRORS = 20


@dataclass
class Prompt:
    text: Text
    """The prompt as the records give it: a string, or messages ending with the user's turn."""
    ids: list[int]
    """Its token ids as the policy reads them (chat template with the generation prompt)."""
    where: str
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """The record's ``tools`` and ``chat_template_kwargs``."""


class _Enough(Exception):
    """The first ``limit`` prompts are read: stop reading."""


def read_prompts(
    source: Any, cfg: DataConfig, split: str, tokenizer: Any, limit: int | None = None
) -> list[Prompt]:
    """The first ``limit`` prompts of ``source``, tokenized; a prompt over ``cfg.max_prompt_length``
    keeps its end (the part next to the answer), as in training."""
    prompts: list[Prompt] = []
    findings = Findings()
    encoder = Encoder(tokenizer, cfg, findings)
    reading = Scan(source, split, MAX_ERRORS, progress=False)

    def check(index: int, where: str, record: dict[str, Any]) -> None:
        if limit is not None and len(prompts) >= limit:
            raise _Enough
        if cfg.prompt_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise DataError(f"{where}: missing field '{cfg.prompt_field}' (the record has: {fields})")
        text = check_text(record[cfg.prompt_field], where, cfg.prompt_field)
        if is_empty(text):
            raise DataError(f"{where}: field '{cfg.prompt_field}' is empty")
        check_turns(text, cfg.prompt_field, {}, where)
        kwargs = template_kwargs(record, where)
        ids = window.prompt(encoder, text, kwargs, where)
        prompts.append(Prompt(text, ids, where, kwargs))

    with contextlib.suppress(_Enough):
        reading.each(check)
    reading.raise_errors()
    if not prompts:
        raise DataError(f"{reading.name}: no prompts")
    for line in findings.lines():
        warnings.warn(f"{reading.name}: {line}", stacklevel=2)
    return prompts


def check_room(prompts: list[Prompt], cfg: DataConfig, name: str) -> None:
    """Online DPO trains on its samples within ``data.max_length``: a prompt that fills it alone
    leaves no room for a completion, and its pairs are dropped. Every prompt doing so is refused
    before anything samples; some doing so is said once, with the first places."""
    if cfg.max_length is None:
        return
    full = [prompt for prompt in prompts if len(prompt.ids) >= cfg.max_length]
    if not full:
        return
    shortest = min(full, key=lambda prompt: len(prompt.ids))
    if len(full) == len(prompts):
        raise DataError(
            f"{name}: every prompt fills data.max_length={cfg.max_length} (the shortest, {shortest.where}, is "
            f"{len(shortest.ids)} tokens) and leaves no room for a completion, so no sampled pair could "
            "train; raise data.max_length, or set data.max_prompt_length below it to keep each prompt's end"
        )
    places = ", ".join(prompt.where for prompt in full[:3]) + (
        f" and {len(full) - 3} more" if len(full) > 3 else ""
    )
    warnings.warn(
        f"{name}: {len(full)} of {len(prompts)} prompts fill data.max_length={cfg.max_length} ({places}); "
        "their samples cannot train and their pairs will be dropped",
        stacklevel=2,
    )
