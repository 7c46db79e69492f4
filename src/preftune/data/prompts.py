"""Prompts for the recipes that sample (online DPO, PPO): any file ``train`` reads whose records
have a ``prompt`` field, a string or chat messages; every bad record reported together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .prepare import error_report, source_name
from .readers import read_records
from .records import Text, check_text, is_empty
from .tokenize import check_tokenizer, encode

MAX_ERRORS = 20


@dataclass
class Prompt:
    text: Text
    """The prompt as the records give it: a string, or messages ending with the user's turn."""
    ids: list[int]
    """Its token ids as the policy reads them (chat template with the generation prompt)."""
    where: str


def read_prompts(
    source: Any, cfg: DataConfig, split: str, tokenizer: Any, limit: int | None = None
) -> list[Prompt]:
    """The first ``limit`` prompts of ``source``, tokenized; a prompt over ``cfg.max_prompt_length``
    keeps its end (the part next to the answer), as in training."""
    prompts: list[Prompt] = []
    errors: list[DataError] = []
    name = source_name(source)
    for where, record in read_records(source, split, errors):
        if limit is not None and len(prompts) >= limit:
            break
        try:
            if cfg.prompt_field not in record:
                fields = ", ".join(sorted(record)) or "none"
                raise DataError(f"{where}: missing field '{cfg.prompt_field}' (the record has: {fields})")
            text = check_text(record[cfg.prompt_field], where, cfg.prompt_field)
            if is_empty(text):
                raise DataError(f"{where}: field '{cfg.prompt_field}' is empty")
            if isinstance(text, list) and text[-1]["role"] == "assistant":
                raise DataError(
                    f"{where}: field '{cfg.prompt_field}' ends with an assistant turn; a prompt ends "
                    "where the model's answer starts"
                )
            check_tokenizer(tokenizer, isinstance(text, list), where)
            ids = encode(tokenizer, text, add_generation_prompt=isinstance(text, list))
        except DataError as err:
            errors.append(err)
            if len(errors) >= MAX_ERRORS:
                break
            continue
        if cfg.max_prompt_length is not None and len(ids) > cfg.max_prompt_length:
            ids = ids[len(ids) - cfg.max_prompt_length :]
        prompts.append(Prompt(text, ids, where))
    if errors:
        raise error_report(name, errors, len(errors) >= MAX_ERRORS)
    if not prompts:
        raise DataError(f"{name}: no prompts")
    return prompts
