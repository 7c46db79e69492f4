"""Read, validate, tokenize and truncate a whole source, collecting every bad record."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import DataError
from .readers import read_records
from .records import PreferenceExample, parse_example
from .report import DataReport
from .tokenize import TokenizedPair, TokenizerProblem, check_tokenizer, tokenize_example, truncate


def source_name(source: Any) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return "records" if isinstance(source, list) else "dataset"


def parse_or_skip(
    record: dict[str, Any], where: str, cfg: DataConfig, margin_field: str | None, report: DataReport
) -> PreferenceExample | None:
    """The validated example, or None for an identical pair the policy drops."""
    chosen = record.get(cfg.chosen_field)
    # Only well-formed, non-empty values count as identical; parse_example reports the rest.
    well_formed = isinstance(chosen, str | list) and not (isinstance(chosen, str) and not chosen.strip())
    if well_formed and chosen and chosen == record.get(cfg.rejected_field):
        report.identical += 1
        if cfg.identical_pairs == "error":
            raise DataError(
                f"{where}: field '{cfg.chosen_field}' is identical to field '{cfg.rejected_field}' "
                "(set data.identical_pairs=warn or drop)"
            )
        # With an implicit prompt, identical texts leave no completion to keep.
        if cfg.identical_pairs == "drop" or record.get(cfg.prompt_field) is None:
            report.dropped_identical += 1
            return None
    return parse_example(record, where, cfg, margin_field)


def _tokenized(
    tokenizer: Any, example: PreferenceExample, index: int, cfg: DataConfig, report: DataReport
) -> TokenizedPair | None:
    prompt_ids, chosen_ids, rejected_ids = tokenize_example(tokenizer, example)
    if not chosen_ids or not rejected_ids:
        field_name = cfg.chosen_field if not chosen_ids else cfg.rejected_field
        raise DataError(f"{example.where}: field '{field_name}' tokenizes to no completion token")
    pair = TokenizedPair(prompt_ids, chosen_ids, rejected_ids, index, example.where, example.margin)
    return measure_and_truncate(pair, cfg, report)


def measure_and_truncate(pair: TokenizedPair, cfg: DataConfig, report: DataReport) -> TokenizedPair | None:
    """Count the pair's token lengths as in the data, then apply the truncation policy."""
    report.prompt_lengths.append(len(pair.prompt_ids))
    report.chosen_lengths.append(len(pair.chosen_ids))
    report.rejected_lengths.append(len(pair.rejected_ids))
    report.completion_lengths.append(max(len(pair.chosen_ids), len(pair.rejected_ids)))
    return truncate(pair, cfg, report)


def error_report(name: str, errors: list[DataError], stopped: bool) -> DataError:
    """One error as it is; several as one message whose first line is the first error."""
    if len(errors) == 1:
        return errors[0]
    more = f"{len(errors) - 1} more" + (" (reading stopped there)" if stopped else "")
    return DataError("\n  ".join([str(errors[0]) + f"\n{name}: {more}:", *map(str, errors[1:])]))


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
    report = DataReport()
    pairs: list[TokenizedPair] = []
    errors: list[DataError] = []
    checked_formats: set[bool] = set()
    warned_implicit = False
    record_errors = 0
    records = read_records(source, split, errors)
    desc = "checking and tokenizing" if tokenizer is not None else "checking"
    bar = tqdm(records, desc=desc, unit=" pairs", disable=None if progress else True, leave=False)
    for index, (where, record) in enumerate(bar):
        report.records += 1
        if len(errors) >= max_errors:
            break
        try:
            example = parse_or_skip(record, where, cfg, margin_field, report)
            if example is None or tokenizer is None:
                continue
            if example.conversational not in checked_formats:  # a tokenizer problem stops at once
                check_tokenizer(tokenizer, example.conversational, where)
                checked_formats.add(example.conversational)
            pair = _tokenized(tokenizer, example, index, cfg, report)
        except TokenizerProblem:
            raise
        except DataError as err:
            errors.append(err)
            record_errors += 1
            continue
        others = [str(k) for k in record if k not in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)]
        if not warned_implicit and record.get(cfg.prompt_field) is None and others:
            # The prompt may sit in a field under another name: say which rule was applied.
            warned_implicit = True
            warnings.warn(
                f"{where}: field '{cfg.prompt_field}' is missing or null (other fields: {', '.join(sorted(others))}); "
                f"using the shared prefix of '{cfg.chosen_field}' and '{cfg.rejected_field}' as the prompt — "
                "set data.prompt_field if the prompt is in another field",
                stacklevel=2,
            )
        if pair is not None:
            pairs.append(pair)
    report.kept = len(pairs)
    report.records += len(errors) - record_errors  # lines that never became a record (malformed JSON)
    return pairs, report, errors


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
    optional numeric column kept as :attr:`TokenizedPair.margin`.
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
