"""LLaMA-Factory's datasets read as preftune's records.

``dataset: dpo_en_demo`` in a LLaMA-Factory file names an entry of ``<dataset_dir>/dataset_info.json``
whose records are in LLaMA-Factory's own shapes: ShareGPT (``conversations`` of ``{"from",
"value"}`` turns, ``chosen`` / ``rejected`` single turns) or Alpaca (``instruction``, ``input``,
``output``, ``history``). They become preftune's conversational records here, as LLaMA-Factory
would render them through its template: pairs for ``dpo`` and ``rm``, ``{prompt, completion,
label}`` for ``kto`` (its ``kto_tag`` column), whole ``messages`` for ``sft``; ``max_samples``
keeps the first N, as LLaMA-Factory does.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import RunConfig
from ..config.foreign import llamafactory_dataset, plain
from ..config.load import read_yaml
from ..errors import DataError
from .flags import settings

_SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
}


def llamafactory_records(args: argparse.Namespace, config: RunConfig, command: str) -> dict[str, Any]:
    """``train_data`` / ``eval_data`` for the recipe when the run names a LLaMA-Factory dataset; else {}."""
    file = read_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {
        key: value
        for key, value in (item for item in settings(args) if isinstance(item, tuple))
        if "." not in key
    }
    names = {**file, **flags}
    if plain(names.get("dataset")) is None:  # a name only LLaMA-Factory has
        return {}
    found = {"train_data": _records(str(names["dataset"]), names, config, command)}
    if plain(names.get("eval_dataset")) is not None:
        found["eval_data"] = _records(str(names["eval_dataset"]), names, config, command)
    return found


def _records(name: str, names: dict[str, Any], config: RunConfig, command: str) -> list[dict[str, Any]]:
    from ..data import read_records

    path, entry = llamafactory_dataset(name, str(names.get("dataset_dir", "data")))
    limit = plain(names.get("max_samples"))
    out = []
    for i, (where, record) in enumerate(read_records(path, str(entry.get("split", "train")))):
        if limit is not None and i >= int(limit):
            break
        out.append(_record(record, entry, config, command, where))
    return out


def _record(
    record: dict[str, Any], entry: dict[str, Any], config: RunConfig, command: str, where: str
) -> dict[str, Any]:
    columns = entry.get("columns", {})
    sharegpt = entry.get("formatting", "alpaca") == "sharegpt"
    turns = _sharegpt_turns(record, entry, where) if sharegpt else _alpaca_turns(record, columns)
    if sharegpt and columns.get("system", "system") in record and record[columns.get("system", "system")]:
        turns.insert(0, {"role": "system", "content": record[columns.get("system", "system")]})
    data = config.data
    if entry.get("ranking"):
        chosen, rejected = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
        return {
            data.prompt_field: turns,
            data.chosen_field: [_answer(record.get(chosen), entry, where)],
            data.rejected_field: [_answer(record.get(rejected), entry, where)],
        }
    if not sharegpt:
        turns.append({"role": "assistant", "content": record.get(columns.get("response", "output"), "")})
    if "kto_tag" in columns:
        return {
            data.prompt_field: turns[:-1],
            data.completion_field: turns[-1:],
            data.label_field: bool(record.get(columns["kto_tag"])),
        }
    if command != "sft":
        raise DataError(
            f"{where}: LLaMA-Factory dataset entry without ranking or kto_tag: records for sft only"
        )
    return {data.messages_field: turns}


def _sharegpt_turns(record: dict[str, Any], entry: dict[str, Any], where: str) -> list[dict[str, str]]:
    column = entry.get("columns", {}).get("messages", "conversations")
    turns = record.get(column)
    if not isinstance(turns, list):
        raise DataError(
            f"{where}: field '{column}' must be a list of turns (LLaMA-Factory's ShareGPT format)"
        )
    return [_answer(turn, entry, where) for turn in turns]


def _answer(turn: Any, entry: dict[str, Any], where: str) -> dict[str, str]:
    """A ShareGPT turn ``{"from": "gpt", "value": …}`` as ``{"role": "assistant", "content": …}``;
    an Alpaca ranking's answer is plain text."""
    if isinstance(turn, str):
        return {"role": "assistant", "content": turn}
    tags = {**_SHAREGPT_TAGS, **entry.get("tags", {})}
    if not isinstance(turn, dict) or tags["role_tag"] not in turn:
        raise DataError(
            f"{where}: expected a turn with '{tags['role_tag']}' and '{tags['content_tag']}', got {turn!r}"
        )
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    role = turn[tags["role_tag"]]
    if role not in roles:
        raise DataError(f"{where}: turn role {role!r} has no preftune equivalent ({', '.join(roles)})")
    return {"role": roles[role], "content": turn.get(tags["content_tag"], "")}


def _alpaca_turns(record: dict[str, Any], columns: dict[str, str]) -> list[dict[str, str]]:
    """Alpaca: the instruction and its input joined by a new line, after the history's turns."""
    turns = []
    system = record.get(columns.get("system", "system"))
    if system:
        turns.append({"role": "system", "content": system})
    for question, answer in record.get(columns.get("history", "history")) or []:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt = record.get(columns.get("prompt", "instruction"), "")
    query = record.get(columns.get("query", "input"))
    turns.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    return turns
