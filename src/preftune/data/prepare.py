"""Read, validate, tokenize and truncate a whole source of pairs, collecting every bad record."""

from __future__ import annotations

import warnings
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .records import NoPreference, PreferenceExample, is_empty, parse_example
from .report import DataReport
from .scan import Scan, error_report, source_name
from .tokenize import Encoder, TokenizedPair, truncate

__all__ = ["error_report", "measure_and_truncate", "parse_or_skip", "prepare_pairs", "scan", "source_name"]


def parse_or_skip(
    record: dict[str, Any], where: str, cfg: DataConfig, margin_field: str | None, report: DataReport
) -> PreferenceExample | None:
    """The validated example, or None for a pair a policy drops (identical, empty, no preference)."""
    try:
        example = parse_example(record, where, cfg, margin_field)
    except NoPreference as reason:
        report.findings.note("no_preference", "dropped", where, str(reason).split(": ", 1)[1])
        return None
    return apply_policies(example, cfg, report)


def apply_policies(
    example: PreferenceExample, cfg: DataConfig, report: DataReport
) -> PreferenceExample | None:
    """``data.identical_pairs`` and ``data.empty_completions`` on one example; None: dropped."""
    where, (chosen_field, rejected_field) = example.where, example.fields
    if example.identical:
        report.identical += 1
        report.findings.note("identical", f"data.identical_pairs={cfg.identical_pairs}", where)
        if cfg.identical_pairs == "error":
            raise DataError(
                f"{where}: field '{chosen_field}' is identical to field '{rejected_field}' "
                "(set data.identical_pairs=warn or drop)"
            )
        # With an implicit prompt, identical texts leave no completion to keep.
        if cfg.identical_pairs == "drop" or is_empty(example.prompt):
            report.dropped_identical += 1
            return None
    if not example.empty:
        return example
    policy, name = cfg.empty_completions, example.empty[0]
    report.findings.note("empty_completion", f"data.empty_completions={policy}", where, f"field '{name}'")
    if policy == "error":
        raise DataError(
            f"{where}: field '{name}' is an empty completion (data.empty_completions=error; drop or keep to go on)"
        )
    if policy == "drop":
        return None
    # keep: train an EOS-only completion, as TRL does (the template's end of turn for messages).
    example.chosen, example.rejected = (
        _eos_only(v) if is_empty(v) else v for v in (example.chosen, example.rejected)
    )
    return example


def _eos_only(value: Any) -> Any:
    return "" if isinstance(value, str) else [{"role": "assistant", "content": ""}]


def _tokenized(
    encoder: Encoder, example: PreferenceExample, index: int, cfg: DataConfig, report: DataReport
) -> TokenizedPair | None:
    prompt_ids, (chosen_ids, rejected_ids) = encoder.completions(
        example.prompt,
        [example.chosen, example.rejected],
        example.template_kwargs,
        example.where,
        example.fields,
    )
    if not chosen_ids or not rejected_ids:
        field_name = example.fields[0] if not chosen_ids else example.fields[1]
        raise DataError(f"{example.where}: field '{field_name}' tokenizes to no completion token")
    if chosen_ids == rejected_ids and not example.identical and not _identical_tokens(example, cfg, report):
        return None
    pair = TokenizedPair(prompt_ids, chosen_ids, rejected_ids, index, example.where, example.margin)
    return measure_and_truncate(pair, cfg, report)


def _identical_tokens(example: PreferenceExample, cfg: DataConfig, report: DataReport) -> bool:
    """``data.identical_pairs`` for answers that differ only in what the chat template removes
    (trailing whitespace, which Llama-3.1 and Gemma-2 trim); False: dropped."""
    chosen, rejected = example.fields
    report.identical += 1
    policy = cfg.identical_pairs
    evidence = f"{chosen!r} and {rejected!r} differ only in text the template removes"
    report.findings.note("identical_tokens", f"data.identical_pairs={policy}", example.where, evidence)
    if policy == "error":
        raise DataError(
            f"{example.where}: fields '{chosen}' and '{rejected}' give identical token ids after the chat "
            "template (set data.identical_pairs=warn or drop)"
        )
    if policy == "drop":
        report.dropped_identical += 1
        return False
    return True


def measure_and_truncate(pair: TokenizedPair, cfg: DataConfig, report: DataReport) -> TokenizedPair | None:
    """Count the pair's token lengths as in the data, then apply the truncation policy."""
    report.prompt_lengths.append(len(pair.prompt_ids))
    report.chosen_lengths.append(len(pair.chosen_ids))
    report.rejected_lengths.append(len(pair.rejected_ids))
    report.completion_lengths.append(max(len(pair.chosen_ids), len(pair.rejected_ids)))
    return truncate(pair, cfg, report)


def check_margin_field(cfg: DataConfig, margin_field: str | None) -> None:
    if margin_field == "scores" and not cfg.score_fields:
        raise ConfigError("rm.margin_field=scores takes the margin from data.score_fields, which is not set")


def scan(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    margin_field: str | None = None,
    max_errors: int = 20,
) -> tuple[list[TokenizedPair], DataReport, list[DataError]]:
    """Every record of ``source`` checked (and, with a tokenizer, tokenized and truncated);
    bad records are collected up to ``max_errors`` rather than raised."""
    check_margin_field(cfg, margin_field)
    report = DataReport()
    pairs: list[TokenizedPair] = []
    encoder = Encoder(tokenizer, cfg, report.findings) if tokenizer is not None else None
    desc = "checking and tokenizing" if tokenizer is not None else "checking"
    reading = Scan(source, split, max_errors, progress, desc, " pairs")
    warned_implicit = False

    def check(index: int, where: str, record: dict[str, Any]) -> None:
        nonlocal warned_implicit
        example = parse_or_skip(record, where, cfg, margin_field, report)
        if example is None or encoder is None:
            return
        pair = _tokenized(encoder, example, index, cfg, report)
        fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, "tools", "chat_template_kwargs")
        others = [str(k) for k in record if k not in fields]
        implicit = record.get(cfg.prompt_field) is None and not cfg.response_fields
        if not warned_implicit and implicit and others:
            # The prompt may sit in a field under another name: say which rule was applied.
            warned_implicit = True
            warnings.warn(
                f"{where}: field '{cfg.prompt_field}' is missing or null (other fields: {', '.join(sorted(others))}); "
                f"using the shared prefix of '{cfg.chosen_field}' and '{cfg.rejected_field}' as the prompt — "
                "set data.prompt_field if the prompt is in another field",
                stacklevel=4,
            )
        if pair is not None:
            pairs.append(pair)

    reading.each(check)
    report.records = reading.records
    report.kept = len(pairs)
    return pairs, report, reading.errors


def prepare_pairs(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    margin_field: str | None = None,
    max_errors: int = 20,
) -> tuple[list[TokenizedPair], DataReport]:
    """Read, validate, tokenize and truncate every record of ``source``.

    Bad records are collected, up to ``max_errors``, and reported together in one
    :class:`DataError` (the first line is the first error). ``margin_field`` names an
    optional numeric column kept as :attr:`TokenizedPair.margin` (``scores``: the difference
    of ``data.score_fields``).
    """
    name = source_name(source)
    pairs, report, errors = scan(source, tokenizer, cfg, split, progress, margin_field, max_errors)
    if errors:
        raise error_report(name, errors, len(errors) >= max_errors)
    if report.records == 0:
        raise DataError(f"{name}: no records")
    if report.identical == report.records:
        raise DataError(
            f"{name}: every pair has chosen identical to rejected; there is nothing to learn from them"
        )
    if report.identical and cfg.identical_pairs == "warn":
        warnings.warn(f"{report.identical} pairs have chosen identical to rejected", stacklevel=2)
    if not pairs:
        raise DataError(f"{name}: every pair was dropped\n{report.summary()}")
    return pairs, report
