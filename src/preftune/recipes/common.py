"""Steps every recipe on preference pairs shares: the tokenizer and the validated pairs."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import RunConfig
from ..data import DataReport, TokenizedPair, prepare_pairs
from ..data.prepare import measure_and_truncate
from ..data.store import Examples
from ..engine import Harness
from ..errors import DataError
from ..model.attention import choose_layout
from ..model.load import load_tokenizer, prepare_tokenizer


def tokenizer_for(config: RunConfig, tokenizer: Any = None) -> Any:
    """The run's tokenizer (loaded, or the object given) with its EOS / pad / template settings."""
    if tokenizer is None:
        return load_tokenizer(config.model, config.data.chat_template)
    return prepare_tokenizer(tokenizer, config.model, config.data.chat_template)


def layout_for(harness: Harness, model: nn.Module, reference: Any = None) -> str:
    """The batch layout of ``data.layout`` that ``model`` takes, and a live ``reference`` too (it
    runs the same batches, so its attention must take their mask); a notice says why when the
    padded layout is kept instead."""
    layout, notice = choose_layout(
        harness.config.data.layout,
        model,
        getattr(reference, "model", None),
        device_type=harness.device.type,
    )
    if notice:
        harness.say(notice)
    return layout


def load_pairs(
    harness: Harness,
    tokenizer: Any,
    train_data: Any = None,
    eval_data: Any = None,
    margin_field: str | None = None,
) -> tuple[list[TokenizedPair] | Examples[TokenizedPair], list[TokenizedPair], DataReport]:
    """Training and eval pairs, every record checked before any model loads.

    Eval pairs are numbered after every training record (dropped ones included), so the
    keys of a precomputed reference never collide.
    """
    data = harness.config.data
    progress = harness.config.train.progress and harness.is_main
    source = train_data if train_data is not None else data.path
    pairs: list[TokenizedPair] | Examples[TokenizedPair]  # a stored source's pairs are read as drawn
    if isinstance(source, list) and source and all(isinstance(p, TokenizedPair) for p in source):
        pairs, report = tokenized_pairs(source, data)
    else:
        pairs, report = prepare_pairs(source, tokenizer, data, data.split, progress, margin_field)
    harness.say(f"data: {report.summary()}")
    eval_pairs: list[TokenizedPair] = []
    if eval_data is not None or data.eval_path:
        eval_source = eval_data if eval_data is not None else data.eval_path
        loaded, _ = prepare_pairs(eval_source, tokenizer, data, data.eval_split, False, margin_field)
        eval_pairs = [
            TokenizedPair(
                p.prompt_ids, p.chosen_ids, p.rejected_ids, report.records + p.index, p.where, p.margin
            )
            for p in loaded
        ]
    return pairs, eval_pairs, report


def tokenized_pairs(pairs: list[TokenizedPair], data: Any) -> tuple[list[TokenizedPair], DataReport]:
    """Pairs already in token ids (online DPO's samples, trained on exactly as generated): only
    the length limits apply."""
    report = DataReport(records=len(pairs))
    kept = []
    for pair in pairs:
        truncated = measure_and_truncate(pair, data, report)
        if truncated is not None:
            kept.append(truncated)
    report.kept = len(kept)
    if pairs and not kept:
        raise DataError(
            f"every pair was dropped ({len(pairs)} of {len(pairs)}): {dropped_cause(report, data)}"
        )
    return kept, report


def dropped_cause(report: DataReport, data: Any) -> str:
    """Why no pair of ``report`` was kept, with the places to look at and the settings to change."""
    overlong = report.findings.by_rule.get("overlong_prompt")
    if overlong is None:
        return report.summary().replace("\n", "; ")
    lengths = sorted(set(report.prompt_lengths))
    tokens = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]} to {lengths[-1]}"
    more = (
        f" and {overlong.count - len(overlong.wheres)} more" if overlong.count > len(overlong.wheres) else ""
    )
    return (
        f"prompts of {tokens} tokens fill data.max_length={data.max_length} and leave no room for a "
        f"completion ({', '.join(overlong.wheres)}{more}); raise data.max_length, or set "
        "data.max_prompt_length below it to keep each prompt's end"
    )
