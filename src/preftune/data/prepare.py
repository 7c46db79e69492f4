"""Read, validate, tokenize and truncate a whole source of pairs, collecting every bad record.

Records are scanned in chunks (:func:`.scan.scan_chunks`), each chunk tokenized in one batch and,
with ``data.num_proc`` above 1, in worker processes; the pairs go to a sink: the tokenized store
(:mod:`.cache`), or memory for a source with no identity (a list of records).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from . import window
from .cache import TMP, Collected, Job, processes, tokenized
from .readers import Source
from .records import NoPreference, PreferenceExample, is_empty, parse_example
from .report import DataReport
from .scan import (
    Chunk,
    ChunkResult,
    Decoded,
    LimitedWarning,
    Progress,
    Sink,
    caught_warnings,
    chunks_of,
    decode,
    error_report,
    scan_chunks,
    scan_items,
    source_name,
)
from .store import Examples, Rows, Store, split_parts
from .tokenize import Encoder, TokenizedPair, truncate

__all__ = ["error_report", "measure_and_truncate", "parse_or_skip", "prepare_pairs", "scan", "source_name"]


class ImplicitPromptWarning(LimitedWarning):
    """The prompt field is missing and others are there: said once for the whole source."""


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
    prompt_ids, (chosen_ids, rejected_ids), cut = window.completions(
        encoder,
        example.prompt,
        [example.chosen, example.rejected],
        example.template_kwargs,
        example.where,
        example.fields,
        window.pair_judge,
    )
    if not chosen_ids or not rejected_ids:
        field_name = example.fields[0] if not chosen_ids else example.fields[1]
        raise DataError(f"{example.where}: field '{field_name}' tokenizes to no completion token")
    report.windowed += bool(cut)
    # Windows of two different answers may start alike: only whole answers are compared.
    same = chosen_ids == rejected_ids and not example.identical and "answers" not in cut
    if same and not _identical_tokens(example, cfg, report):
        return None
    pair = TokenizedPair(prompt_ids, chosen_ids, rejected_ids, index, example.where, example.margin)
    return measure_and_truncate(pair, cfg, report, "prompt" in cut)


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


def measure_and_truncate(
    pair: TokenizedPair, cfg: DataConfig, report: DataReport, windowed: bool = False
) -> TokenizedPair | None:
    """Count the pair's token lengths as in the data (``windowed``: as far as they were tokenized),
    then apply the truncation policy."""
    report.prompt_lengths.append(len(pair.prompt_ids))
    report.chosen_lengths.append(len(pair.chosen_ids))
    report.rejected_lengths.append(len(pair.rejected_ids))
    report.completion_lengths.append(max(len(pair.chosen_ids), len(pair.rejected_ids)))
    return truncate(pair, cfg, report, windowed)


def check_margin_field(cfg: DataConfig, margin_field: str | None) -> None:
    if margin_field == "scores" and not cfg.score_fields:
        raise ConfigError("rm.margin_field=scores takes the margin from data.score_fields, which is not set")


def _pair_check(
    encoder: Encoder | None,
    cfg: DataConfig,
    margin_field: str | None,
    report: DataReport,
    rows: Rows,
    parsed: dict[str, PreferenceExample],
) -> Callable[[int, str, dict[str, Any]], None]:
    """The check of one record: parsed (or taken from ``parsed``, records whose parse notes
    nothing), the policies applied, tokenized and truncated, kept in ``rows``."""
    warned_implicit = False

    def check(index: int, where: str, record: dict[str, Any]) -> None:
        nonlocal warned_implicit
        example = parsed.pop(where, None) or parse_or_skip(record, where, cfg, margin_field, report)
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
                ImplicitPromptWarning,
                stacklevel=4,
            )
        if pair is not None:
            rows.add(
                (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids), pair.index, where, margin=pair.margin
            )
            report.kept += 1

    return check


def _prefetch(
    encoder: Encoder | None, items: list[Decoded], cfg: DataConfig, margin_field: str | None
) -> dict[str, PreferenceExample]:
    """The chunk's records parsed, and every text their pairs will tokenize tokenized in one call.
    Returns the examples whose parse noted nothing, by ``where``; the others (dropped, flagged, bad)
    the check parses again, so that what it notes is noted in order."""
    texts: list[str] = []
    parsed: dict[str, PreferenceExample] = {}
    scratch = DataReport()
    for where, record in items:
        if not isinstance(record, dict):
            continue
        noted = scratch.identical + sum(f.count for f in scratch.findings.by_rule.values())
        try:
            example = parse_or_skip(record, where, cfg, margin_field, scratch)
        except DataError:
            continue
        if example is None:
            continue
        if noted == scratch.identical + sum(f.count for f in scratch.findings.by_rule.values()):
            parsed[where] = example
        if encoder is not None:
            texts += encoder.texts(example.prompt, [example.chosen, example.rejected])
    if encoder is not None:
        encoder.prefetch(texts)
    return parsed


def pairs_work(tokenizer: Any, cfg: DataConfig, margin_field: str | None) -> Callable[[Chunk], ChunkResult]:
    """A chunk of records -> its pairs in columns, its report and errors (run in a worker)."""

    def work(chunk: Chunk) -> ChunkResult:
        report, rows = DataReport(), Rows(3)
        encoder = Encoder(tokenizer, cfg, report.findings) if tokenizer is not None else None
        items = decode(chunk.items)
        parsed = _prefetch(encoder, items, cfg, margin_field)
        check = _pair_check(encoder, cfg, margin_field, report, rows, parsed)
        counted, caught = caught_warnings(lambda: scan_items(items, chunk.budget, check))
        return ChunkResult(counted, report, rows.arrays(), caught)

    return work


def scan_pairs(
    source: Source,
    tokenizer: Any,
    cfg: DataConfig,
    sink: Sink,
    progress: Progress,
    margin_field: str | None = None,
    max_errors: int = 20,
) -> tuple[DataReport, list[DataError]]:
    """Every record of ``source`` checked (and, with a tokenizer, tokenized and truncated), the
    pairs to ``sink``; bad records are collected up to ``max_errors`` rather than raised."""
    check_margin_field(cfg, margin_field)
    report = DataReport()
    progress.desc = "checking and tokenizing" if tokenizer is not None else "checking"
    records, errors = scan_chunks(
        lambda budget: chunks_of(source.items(), budget),
        pairs_work(tokenizer, cfg, margin_field),
        report,
        sink,
        processes(cfg),
        max_errors,
        progress,
    )
    report.records = records
    return report, errors


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
    collected = Collected(3)
    opened = Source(source, split)
    report, errors = scan_pairs(
        opened, tokenizer, cfg, collected, Progress(progress), margin_field, max_errors
    )
    return collected.examples(pair_item, opened.name), report, errors


def pair_item(store: Store, i: int, name: str, margin_field: str | None = None) -> TokenizedPair:
    """Pair ``i`` of a store, its margin taken from ``margin_field`` (None: 0, as a scan without one)."""
    ids, parts = store.ids(i)
    prompt, chosen, rejected = split_parts(ids, parts)
    margins = margin_column(store, margin_field)
    margin = 0.0 if margins is None else float(margins[i])
    return TokenizedPair(
        prompt, chosen, rejected, int(store.columns["index"][i]), store.where(i, name), margin
    )


def margin_column(store: Store, margin_field: str | None) -> np.ndarray | None:
    """The margins of ``margin_field``: the column the store was written with, or one added later."""
    if margin_field is None:
        return None
    if store.meta.get("margin_field", margin_field) == margin_field:  # built with it (or in memory)
        return store.columns.get("margin")
    return store.sidecar(MARGINS + hashlib.sha256(margin_field.encode()).hexdigest()[:16])


MARGINS = "margin-"
"""The name of a margins column added to a store built for another margin field."""


class _Margins:
    """A sink that keeps each record's position and margin."""

    def __init__(self) -> None:
        self.index: list[np.ndarray] = []
        self.margin: list[np.ndarray] = []

    def add(self, arrays: dict[str, np.ndarray], base: int = 0) -> None:
        self.index.append(arrays["index"] + base)
        self.margin.append(arrays["margin"])


def margins_work(cfg: DataConfig, margin_field: str) -> Callable[[Chunk], ChunkResult]:
    """A chunk of records -> each one's margin (its position within the chunk beside it)."""

    def work(chunk: Chunk) -> ChunkResult:
        index: list[int] = []
        margin: list[float] = []

        def check(i: int, where: str, record: dict[str, Any]) -> None:
            try:
                example = parse_example(record, where, cfg, margin_field)
            except NoPreference:
                return
            index.append(i)
            margin.append(example.margin)

        counted = scan_items(decode(chunk.items), chunk.budget, check)
        arrays = {"index": np.array(index, np.int64), "margin": np.array(margin, np.float64)}
        return ChunkResult(counted, DataReport(), arrays)

    return work


def complete_margins(
    folder: Path, source: Source, cfg: DataConfig, margin_field: str | None, max_errors: int
) -> None:
    """A store written without ``margin_field``'s margins gets them as a column of their own: the
    records are read again (no tokenizing), a bad margin reported as a scan with it would report it."""
    store = Store.open(folder)
    if margin_field is None or margin_column(store, margin_field) is not None:
        return
    sink = _Margins()
    _, errors = scan_chunks(
        lambda budget: chunks_of(source.items(), budget),
        margins_work(cfg, margin_field),
        DataReport(),
        sink,
        processes(cfg),
        max_errors,
        Progress(False),
    )
    if errors:
        raise error_report(source.name, errors, len(errors) >= max_errors)
    found, values = np.concatenate(sink.index), np.concatenate(sink.margin)
    name = MARGINS + hashlib.sha256(margin_field.encode()).hexdigest()[:16]
    tmp = folder / f"{TMP}{name}-{os.getpid()}.bin"
    tmp.write_bytes(values[np.searchsorted(found, store.column("index"))].astype(np.float64).tobytes())
    os.replace(tmp, folder / f"{name}.bin")  # whole or not at all


def finish_pairs(
    report: DataReport, errors: list[DataError], name: str, max_errors: int, cfg: DataConfig | None
) -> None:
    """What a finished scan of pairs must pass: no bad record, records, not all identical, a pair kept
    (``check-data`` gives the same verdicts; ``cfg`` None: it has told the identical pairs itself)."""
    if errors:
        raise error_report(name, errors, len(errors) >= max_errors)
    if report.records == 0:
        raise DataError(f"{name}: no records")
    if report.identical == report.records:
        raise DataError(
            f"{name}: every pair has chosen identical to rejected; there is nothing to learn from them"
        )
    if report.identical and cfg is not None and cfg.identical_pairs == "warn":
        warnings.warn(f"{report.identical} pairs have chosen identical to rejected", stacklevel=4)
    if not report.kept:
        raise DataError(f"{name}: every pair was dropped\n{report.summary()}")


def prepare_pairs(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    margin_field: str | None = None,
    max_errors: int = 20,
) -> tuple[list[TokenizedPair] | Examples[TokenizedPair], DataReport]:
    """Read, validate, tokenize and truncate every record of ``source``.

    Bad records are collected, up to ``max_errors``, and reported together in one
    :class:`DataError` (the first line is the first error). ``margin_field`` names an
    optional numeric column kept as :attr:`TokenizedPair.margin` (``scores``: the difference
    of ``data.score_fields``).

    A file or a hub dataset is tokenized once into the tokenized store (``data.cache``) and the
    pairs are read from it as they are drawn (a lazy sequence); a list of records gives a list.
    """
    check_margin_field(cfg, margin_field)
    # The margin field is not in the key: it decides no id, so `rm train` and `train` share the
    # store; a store written without this field's margins gets them added (complete_margins).
    job = Job(
        kind="pairs",
        settings={},
        parts=3,
        report_type=DataReport,
        scan=lambda opened, sink, shown: scan_pairs(
            opened, tokenizer, cfg, sink, shown, margin_field, max_errors
        ),
        item=partial(pair_item, margin_field=margin_field),
        finish=partial(finish_pairs, max_errors=max_errors, cfg=cfg),
        meta={"margin_field": margin_field},
        complete=lambda folder, opened: complete_margins(folder, opened, cfg, margin_field, max_errors),
    )
    return tokenized(job, Source(source, split), tokenizer, cfg, progress)
