"""Unpaired records (KTO) -> validated examples -> token ids.

Two record shapes, field names configurable:

* unpaired: ``{"prompt", "completion", "label"}``, text or messages, ``label`` true for a
  desirable completion and false for an undesirable one (``data.label_field``);
* pairs: anything the pairwise reader accepts (``{"prompt", "chosen", "rejected"}``, messages,
  implicit prompts). Each pair becomes a desirable and an undesirable example, in the order TRL's
  ``unpair_preference_dataset`` gives them: per block of :data:`UNPAIR_BLOCK` pairs (the batch of
  its ``datasets`` map), every chosen completion first, then every rejected one.

Tokenized as TRL's ``KTOTrainer`` does, each example on its own: the prompt with the tokenizer's
special tokens, ``prompt + completion`` (+ EOS text for text records) as one string or through the
chat template, and the completion is what follows their longest common prefix.

Truncation follows :func:`preftune.data.truncate`: a prompt over ``max_prompt_length`` keeps its
end; a prompt that fills ``max_length`` alone is dropped (or stops the run); ``prompt +
completion`` over ``max_length`` keeps its start. That last cut is made by the collator, row by
row (TRL's), so a completion borrowed for another prompt's KL sequence is cut to that prompt.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import partial
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from . import window
from .cache import Collected, Job, processes, tokenized
from .prepare import parse_or_skip
from .readers import Source
from .records import PreferenceExample, Text, check_text, check_turns, template_kwargs
from .report import COUNTED_ABOVE, DataReport, Findings, spread, truncation_lines
from .scan import (
    Chunk,
    ChunkResult,
    Counted,
    Progress,
    Scan,
    Sink,
    caught_warnings,
    chunk_size,
    chunks_of,
    decode,
    error_report,
    scan_chunks,
    scan_items,
)
from .sft import empty_completion
from .store import Examples, Rows, Store
from .tokenize import Encoder, overlong

UNPAIR_BLOCK = 1000


@dataclass
class UnpairedExample:
    """One validated example; ``field`` names where its completion came from (for messages)."""

    prompt: Text
    completion: Text
    desirable: bool
    where: str
    field: str
    template_kwargs: dict[str, Any] = dataclass_field(default_factory=dict)
    """The record's ``tools`` and ``chat_template_kwargs``."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class TokenizedUnpaired:
    """Token ids of one example. ``completion_ids`` is whole: the collator cuts each row to
    ``max_length``, whichever prompt it follows."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    index: int
    where: str = ""


@dataclass
class UnpairedReport(DataReport):
    """What happened to the records; ``kept`` counts examples, ``pairs`` the records that were pairs."""

    examples: int = 0
    pairs: int = 0
    desirable: int = 0
    undesirable: int = 0

    def summary(self, with_findings: bool = True) -> str:
        split = f"{self.desirable} desirable, {self.undesirable} undesirable"
        source = f"; {self.pairs} pair{'s' * (self.pairs != 1)} unpaired" if self.pairs else ""
        lines = [
            f"{self.kept}/{self.examples} examples kept ({split}) from {self.records} records{source}",
            f"prompt tokens: {spread(self.prompt_lengths)}; completion tokens: {spread(self.completion_lengths)}",
        ]
        lines += truncation_lines(self, "completions", "examples")
        if self.identical:
            lines.append(
                f"{self.identical} pairs have chosen identical to rejected ({self.dropped_identical} dropped)"
            )
        lines += self.findings.lines(skip=COUNTED_ABOVE) if with_findings else []
        return "\n".join(lines + ([self.cache] if self.cache else []))


def check_label(value: Any, where: str, name: str) -> bool:
    """A label is a boolean; 0/1 and the texts true/false/1/0 (CSV cells) are read as one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{where}: field '{name}' must be true (desirable) or false (undesirable), got {value!r}")


def parse_unpaired(
    record: dict[str, Any], where: str, cfg: DataConfig, findings: Findings
) -> UnpairedExample | None:
    """Validate one ``{prompt, completion, label}`` record; None when ``data.empty_completions=drop``
    drops it."""
    for name in (cfg.prompt_field, cfg.completion_field, cfg.label_field):
        if name not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{where}: missing field '{name}' (fields present: {have})")
    prompt = check_text(record[cfg.prompt_field], where, cfg.prompt_field)
    completion = check_text(record[cfg.completion_field], where, cfg.completion_field)
    if isinstance(prompt, str) != isinstance(completion, str):
        raise DataError(
            f"{where}: fields '{cfg.prompt_field}' and '{cfg.completion_field}' mix text and messages; "
            "use one format"
        )
    check_turns(prompt, cfg.prompt_field, {cfg.completion_field: completion}, where)
    label = check_label(record[cfg.label_field], where, cfg.label_field)
    kwargs = template_kwargs(record, where)
    kept = empty_completion(completion, where, cfg.completion_field, cfg, findings)
    if kept is None:
        return None
    return UnpairedExample(prompt, kept, label, where, cfg.completion_field, kwargs)


def unpair(pairs: list[PreferenceExample]) -> list[UnpairedExample]:
    """A block of pairs as TRL's ``unpair_preference_dataset`` lays it out: the chosen completions
    (desirable), then the rejected ones (undesirable), each with its pair's prompt."""
    chosen = [
        UnpairedExample(p.prompt, p.chosen, True, p.where, p.fields[0], p.template_kwargs) for p in pairs
    ]
    rejected = [
        UnpairedExample(p.prompt, p.rejected, False, p.where, p.fields[1], p.template_kwargs) for p in pairs
    ]
    return chosen + rejected


def _record_check(
    cfg: DataConfig, report: UnpairedReport, emit: Callable[[list[UnpairedExample]], None]
) -> tuple[Callable[[int, str, dict[str, Any]], None], Callable[[], None]]:
    """The check of one record (validated, pairs unpaired by blocks of :data:`UNPAIR_BLOCK`), and
    the call that closes the last block; ``emit`` gets whole blocks of examples, in order."""
    block: list[PreferenceExample] = []

    def check(index: int, where: str, record: dict[str, Any]) -> None:
        nonlocal block
        paired = cfg.completion_field not in record and (
            cfg.chosen_field in record or cfg.rejected_field in record or bool(cfg.response_fields)
        )
        if paired:
            pair = parse_or_skip(record, where, cfg, None, report)
            if pair is not None:
                report.pairs += 1
                block.append(pair)
            if len(block) == UNPAIR_BLOCK:
                emit(unpair(block))
                block = []
        elif cfg.completion_field in record or cfg.label_field in record:
            emit(unpair(block))  # an unpaired record closes the block of pairs before it
            block = []
            example = parse_unpaired(record, where, cfg, report.findings)
            if example is not None:
                emit([example])
        else:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(
                f"{where}: expected fields '{cfg.prompt_field}', '{cfg.completion_field}' and "
                f"'{cfg.label_field}', or a pair ('{cfg.chosen_field}', '{cfg.rejected_field}') "
                f"(fields present: {have})"
            )

    def close() -> None:
        nonlocal block
        emit(unpair(block))
        block = []

    return check, close


def read_unpaired(reading: Scan, cfg: DataConfig, report: UnpairedReport) -> list[UnpairedExample]:
    """Every record checked and pairs unpaired; bad records go to ``reading.errors``."""
    examples: list[UnpairedExample] = []
    check, close = _record_check(cfg, report, examples.extend)
    reading.each(check)
    report.records = reading.records
    close()
    return examples


def truncate_prompt(
    prompt_ids: list[int], where: str, cfg: DataConfig, report: DataReport, windowed: bool = False
) -> list[int] | None:
    """Rules 1 and 2 of :func:`preftune.data.truncate`; None: the example is dropped."""
    if cfg.max_prompt_length is not None and len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - cfg.max_prompt_length :]
        report.prompt_truncated += 1
    if cfg.max_length is not None and len(prompt_ids) >= cfg.max_length:
        overlong(len(prompt_ids), where, cfg, report, "example", windowed)
        return None
    return prompt_ids


def _example_check(
    encoder: Encoder, cfg: DataConfig, report: UnpairedReport, rows: Rows
) -> Callable[[tuple[int, UnpairedExample]], None]:
    def check(item: tuple[int, UnpairedExample]) -> None:
        index, example = item
        # TRL's KTOTrainer tokenizes each example on its own, the completion starting where the
        # prompt's ids and prompt + completion's diverge.
        prompt_ids, (completion_ids,), cut = window.completions(
            encoder,
            example.prompt,
            [example.completion],
            example.template_kwargs,
            example.where,
            (example.field,),
            window.pair_judge,
        )
        if not completion_ids:
            raise DataError(f"{example.where}: field '{example.field}' tokenizes to no completion token")
        report.windowed += bool(cut)
        report.prompt_lengths.append(len(prompt_ids))
        report.completion_lengths.append(len(completion_ids))
        prompt = truncate_prompt(prompt_ids, example.where, cfg, report, "prompt" in cut)
        if prompt is None:
            return
        if cfg.max_length is not None and len(prompt) + len(completion_ids) > cfg.max_length:
            report.completion_truncated += 1
        rows.add((prompt, completion_ids), index, example.where, desirable=example.desirable)
        report.kept += 1
        report.desirable += example.desirable

    return check


def unpaired_work(tokenizer: Any, cfg: DataConfig) -> Callable[[Chunk], ChunkResult]:
    """A chunk of ``(index, example)`` (whole blocks) -> its examples tokenized, in columns."""

    def work(chunk: Chunk) -> ChunkResult:
        report, rows = UnpairedReport(), Rows(2)
        encoder = Encoder(tokenizer, cfg, report.findings)
        items: list[tuple[int, UnpairedExample]] = chunk.items  # type: ignore[assignment]
        if tokenizer.eos_token is not None:
            encoder.prefetch([t for _, e in items for t in encoder.texts(e.prompt, [e.completion])])
        check = _example_check(encoder, cfg, report, rows)
        counted, caught = caught_warnings(lambda: _over(items, chunk.budget, check))
        return ChunkResult(counted, report, rows.arrays(), caught)

    return work


def _over(items: list[tuple[int, UnpairedExample]], budget: int, check: Callable[..., None]) -> Counted:
    """:meth:`Scan.over` on a chunk: stops before an example once ``budget`` errors are collected."""
    counted = Counted()
    for item in items:
        if len(counted.errors) >= budget:
            counted.stopped = True
            break
        counted.records += 1
        try:
            check(item)
        except DataError as err:
            counted.errors.append(err)
    return counted


class _BadRecords(Exception):
    """A record failed its checks: the exact two-pass scan takes over (the errors of every
    record come before those of any example)."""


def _example_chunks(
    source: Source, cfg: DataConfig, report: UnpairedReport, max_errors: int
) -> Callable[[Callable[[], int]], Iterator[Chunk]]:
    """Records read and unpaired here, in order (blocks depend on the pairs kept before them);
    the examples go out in chunks of whole blocks, so a record's examples share a chunk."""

    def chunks(budget: Callable[[], int]) -> Iterator[Chunk]:
        ready: list[tuple[int, UnpairedExample]] = []

        def emit(examples: list[UnpairedExample]) -> None:
            start = report.examples
            ready.extend(enumerate(examples, start))
            report.examples += len(examples)

        check, close = _record_check(cfg, report, emit)
        for raw in chunks_of(source.items(), lambda: max_errors):
            counted = scan_items(decode(raw.items), max_errors, check)
            report.records += counted.records
            if counted.errors:
                raise _BadRecords
            if len(ready) >= chunk_size():
                yield Chunk(ready, budget())  # type: ignore[arg-type]
                ready = []
        close()
        if ready:
            yield Chunk(ready, budget())  # type: ignore[arg-type]

    return chunks


def scan_unpaired_into(
    source: Source, tokenizer: Any, cfg: DataConfig, sink: Sink, progress: Progress, max_errors: int
) -> tuple[UnpairedReport, list[DataError]]:
    """Every record checked, unpaired, tokenized and truncated, the examples to ``sink``."""
    report = UnpairedReport()
    if tokenizer is None:
        return _two_passes(source, None, cfg, sink, progress, max_errors)
    progress.desc = "tokenizing examples"
    try:
        _, errors = scan_chunks(
            _example_chunks(source, cfg, report, max_errors),
            unpaired_work(tokenizer, cfg),
            report,
            sink,
            processes(cfg),
            max_errors,
            progress,
        )
    except _BadRecords:
        return _two_passes(source, tokenizer, cfg, sink, progress, max_errors)
    report.undesirable = report.kept - report.desirable
    return report, errors


def _two_passes(
    source: Source, tokenizer: Any, cfg: DataConfig, sink: Sink, progress: Progress, max_errors: int
) -> tuple[UnpairedReport, list[DataError]]:
    """Every record checked first, then every example tokenized (errors in that order), in memory."""
    report = UnpairedReport()
    reading = Scan(source.source, source.split, max_errors, progress.show, "checking", " records")
    examples = read_unpaired(reading, cfg, report)
    report.examples = len(examples)
    if tokenizer is None:
        return report, reading.errors
    rows = Rows(2)
    reading.over(
        enumerate(examples), _example_check(Encoder(tokenizer, cfg, report.findings), cfg, report, rows)
    )
    sink.add(rows.arrays())
    report.undesirable = report.kept - report.desirable
    return report, reading.errors


def scan_unpaired(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    max_errors: int = 20,
) -> tuple[list[TokenizedUnpaired], UnpairedReport, list[DataError]]:
    """Every record checked, unpaired and (with a tokenizer) tokenized and truncated; bad ones
    collected (up to ``max_errors``)."""
    collected = Collected(2)
    opened = Source(source, split)
    report, errors = scan_unpaired_into(opened, tokenizer, cfg, collected, Progress(progress), max_errors)
    return collected.examples(unpaired_item, opened.name), report, errors


def unpaired_item(store: Store, i: int, name: str) -> TokenizedUnpaired:
    ids, (prompt, _) = store.ids(i)
    desirable = bool(store.columns["desirable"][i])
    return TokenizedUnpaired(
        ids[:prompt], ids[prompt:], desirable, int(store.columns["index"][i]), store.where(i, name)
    )


def finish_unpaired(
    report: UnpairedReport, errors: list[DataError], name: str, max_errors: int, cfg: DataConfig | None
) -> None:
    """What a finished scan of unpaired examples must pass (``check-data`` gives the same verdicts;
    ``cfg`` None: it has told the identical pairs itself)."""
    if errors:
        raise error_report(name, errors, len(errors) >= max_errors)
    if report.records == 0:
        raise DataError(f"{name}: no records")
    if report.identical and cfg is not None and cfg.identical_pairs == "warn":
        warnings.warn(f"{report.identical} pairs have chosen identical to rejected", stacklevel=4)
    if not report.kept:
        raise DataError(f"{name}: every example was dropped\n{report.summary()}")


def prepare_unpaired(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    max_errors: int = 20,
) -> tuple[list[TokenizedUnpaired] | Examples[TokenizedUnpaired], UnpairedReport]:
    """Read, validate, unpair, tokenize and truncate every record of ``source``; bad records are
    reported together in one :class:`DataError` (the first line is the first error). A file or a
    hub dataset is tokenized once into the tokenized store, and read from it lazily."""
    job = Job(
        kind="unpaired",
        settings={},
        parts=2,
        report_type=UnpairedReport,
        scan=lambda opened, sink, shown: scan_unpaired_into(opened, tokenizer, cfg, sink, shown, max_errors),
        item=unpaired_item,
        finish=partial(finish_unpaired, max_errors=max_errors, cfg=cfg),
    )
    return tokenized(job, Source(source, split), tokenizer, cfg, progress)


def balance_warning(
    desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """The KTO paper's advice (Eq. 8) for unequal counts: ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``.
    Returns the warning TRL gives (with the ranges of either weight that satisfy it), or None."""
    n_d, n_u = desirable, undesirable
    if n_d == n_u or not n_d or not n_u:  # one kind alone: no ratio to advise on
        return None
    ratio = desirable_weight * n_d / max(undesirable_weight * n_u, 1e-12)
    if 1 <= ratio <= 4 / 3:
        return None
    lower_d = undesirable_weight * n_u / n_d
    upper_u = desirable_weight * n_d / n_u
    return (
        f"{n_d} desirable and {n_u} undesirable examples, and objective.desirable_weight={desirable_weight}, "
        f"objective.undesirable_weight={undesirable_weight} put λ_D·n_D / (λ_U·n_U) at {ratio:.3g}, outside "
        f"the KTO paper's [1, 4/3]: set desirable_weight in [{lower_d:.3g}, {4 / 3 * lower_d:.3g}] or "
        f"undesirable_weight in [{3 / 4 * upper_u:.3g}, {upper_u:.3g}] (not both)"
    )
