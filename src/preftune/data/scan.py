"""The one way a source is read: records -> check each -> collect the bad ones (up to a limit) ->
report. Pairs, SFT records, unpaired (KTO) records and the prompts of the sampling commands all
go through :class:`Scan`, so every rule about a record (fields, encodings, empty completions, the
chat-template checks) applies to each of them the same way, and a user sees every bad record at
once rather than the first.

Large sources are scanned in chunks (:func:`scan_chunks`): the same loop (:func:`scan_items`) runs
on each chunk of records, in worker processes when there are several, and the chunks' outcomes are
taken in order. The outcome is the one-pass scan's, to the record: when a chunk's errors would
reach ``max_errors``, the chunk is scanned again here with the exact number of errors left, and
reading stops where the one pass would have stopped.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from tqdm.auto import tqdm

from ..errors import DataError
from .parallel import Workers
from .readers import Item, RawLine, Source, parse_line, read_records
from .report import merge_reports

T = TypeVar("T")
R = TypeVar("R")


class TokenizerProblem(DataError):
    """The tokenizer cannot serve the data at all (no EOS, no chat template): no record can be
    read, so the scan stops at once instead of collecting the same error for each."""


def source_name(source: Any) -> str:
    if isinstance(source, Source):
        return source.name
    if isinstance(source, str | Path):
        return str(source)
    return "records" if isinstance(source, list) else "dataset"


class Scan:
    """One pass over ``source``: :meth:`each` calls a check on every record; a
    :class:`DataError` it raises is collected (reading stops at ``max_errors``), a
    :class:`TokenizerProblem` stops the pass."""

    def __init__(
        self,
        source: Any,
        split: str = "train",
        max_errors: int = 20,
        progress: bool = True,
        desc: str = "checking",
        unit: str = " records",
    ):
        self.source = source
        self.name = source_name(source)
        self.split = split
        self.max_errors = max_errors
        self.progress = progress
        self.desc = desc
        self.unit = unit
        self.errors: list[DataError] = []
        self.records = 0
        """Records read, lines that never became a record (malformed JSON) included."""

    @property
    def full(self) -> bool:
        return len(self.errors) >= self.max_errors

    def each(self, check: Callable[[int, str, dict[str, Any]], None]) -> None:
        """``check(index, where, record)`` on every record of the source."""
        before = len(self.errors)
        failed = 0
        records = read_records(self.source, self.split, self.errors)  # unreadable lines land in errors
        bar = tqdm(
            records, desc=self.desc, unit=self.unit, disable=None if self.progress else True, leave=False
        )
        try:
            for index, (where, record) in enumerate(bar):
                self.records += 1
                if self.full:
                    break
                failed += not self._run(check, index, where, record)
        finally:
            bar.close()
        self.records += len(self.errors) - before - failed  # lines that never became a record

    def over(self, items: Iterable[T], check: Callable[[T], None]) -> None:
        """``check(item)`` on items derived from the records (a second pass, e.g. tokenizing
        examples read first), its errors collected with the records'."""
        for item in items:
            if self.full:
                break
            self._run(check, item)

    def _run(self, check: Callable[..., None], *args: Any) -> bool:
        try:
            check(*args)
        except TokenizerProblem:
            raise
        except DataError as err:
            self.errors.append(err)
            return False
        return True

    def raise_errors(self) -> None:
        """Every collected error in one :class:`DataError` (its first line is the first error)."""
        if self.errors:
            raise error_report(self.name, self.errors, self.full)

    def require_records(self, what: str = "records") -> None:
        if self.records == 0:
            raise DataError(f"{self.name}: no {what}")


def error_report(name: str, errors: list[DataError], stopped: bool) -> DataError:
    """One error as it is; several as one message whose first line is the first error."""
    if len(errors) == 1:
        return errors[0]
    more = f"{len(errors) - 1} more" + (" (reading stopped there)" if stopped else "")
    return DataError("\n  ".join([str(errors[0]) + f"\n{name}: {more}:", *map(str, errors[1:])]))


# --------------------------------------------------------------------------- chunks


CHUNK = 512
"""Records per chunk: enough for one tokenizer call per chunk to pay off, few enough that a chunk's
ids stay small (a few MB) in flight."""


class LimitedWarning(UserWarning):
    """A warning shown for the first ``limit`` records of a whole source, not of each chunk."""

    limit = 1


@dataclass
class Counted:
    """What scanning a chunk found: records read (lines that never became one included), how many
    became a record (the next chunk's indices start after them), the errors, and whether reading
    stopped at ``max_errors``."""

    records: int = 0
    good: int = 0
    errors: list[DataError] = field(default_factory=list)
    stopped: bool = False


@dataclass
class Chunk:
    items: list[Item]
    budget: int
    """Errors still allowed when the chunk was sent (stale by the time it is taken: see
    :func:`scan_chunks`)."""


@dataclass
class ChunkResult:
    """A chunk scanned: its counts, its report, its examples in columns, the warnings it raised."""

    counted: Counted
    report: Any
    rows: dict[str, np.ndarray]
    warnings: list[tuple[type[Warning], str]] = field(default_factory=list)


Decoded = tuple[str, "dict[str, Any] | DataError | None"]


def decode(items: Sequence[Item]) -> list[Decoded]:
    """JSONL lines parsed (a line that is no record: its error; a blank line: None)."""
    out: list[Decoded] = []
    for where, record in items:
        if isinstance(record, RawLine):
            try:
                out.append((where, parse_line(record)))
            except DataError as err:
                out.append((where, err))
        else:
            out.append((where, record))
    return out


def scan_items(
    items: Sequence[Decoded], budget: int, check: Callable[[int, str, dict[str, Any]], None]
) -> Counted:
    """:meth:`Scan.each`'s loop on a chunk: ``check(index, where, record)`` on each record, the
    index counted within the chunk; a line that is no record is an error that does not stop
    reading; before each record, reading stops once ``budget`` errors are collected."""
    counted = Counted()
    for where, record in items:
        if record is None:
            continue
        if isinstance(record, DataError):
            counted.errors.append(record)
            counted.records += 1
            continue
        counted.records += 1
        index = counted.good
        counted.good += 1
        if len(counted.errors) >= budget:
            counted.stopped = True
            break
        try:
            check(index, where, record)
        except TokenizerProblem:
            raise
        except DataError as err:
            counted.errors.append(err)
    return counted


def caught_warnings(run: Callable[[], R]) -> tuple[R, list[tuple[type[Warning], str]]]:
    """``run()``'s result and the warnings it raised, kept to be shown once, in order, by the
    process that takes the chunks (a worker's would print from every worker)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, [(w.category, str(w.message)) for w in caught]


class Sink(Protocol):
    def add(self, arrays: dict[str, np.ndarray], base: int = 0) -> None: ...


@dataclass
class Progress:
    """What the chunked scan shows and says: a bar in records/s on a terminal, the time taken."""

    show: bool = True
    desc: str = "tokenizing"
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def chunk_size() -> int:
    return CHUNK


def chunks_of(items: Iterable[Item], budget: Callable[[], int]) -> Iterator[Chunk]:
    """Items in chunks of :data:`CHUNK`, each with the errors still allowed when it is made."""
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == chunk_size():
            yield Chunk(batch, budget())
            batch = []
    if batch:
        yield Chunk(batch, budget())


def scan_chunks(
    chunks: Callable[[Callable[[], int]], Iterable[Chunk]],
    work: Callable[[Chunk], ChunkResult],
    report: Any,
    sink: Sink,
    processes: int,
    max_errors: int,
    progress: Progress,
) -> tuple[int, list[DataError]]:
    """``work`` on every chunk (in ``processes`` workers), the results taken in order: examples
    to ``sink`` (indices shifted to the whole source's), counts and findings to ``report``,
    warnings shown (a :class:`LimitedWarning` for its first records only). Returns the records
    read and the errors, as one pass of :class:`Scan` reads and collects them."""
    errors: list[DataError] = []

    def left_then() -> int:
        return max_errors - len(errors)

    shown: dict[type[Warning], int] = {}
    records = good = 0
    bar = tqdm(desc=progress.desc, unit=" records", disable=None if progress.show else True, leave=False)
    try:
        with Workers(work, processes) as workers:
            for chunk, result in workers.map(chunks(left_then)):
                left = max_errors - len(errors)
                if result.counted.stopped or len(result.counted.errors) >= left:
                    result = work(Chunk(chunk.items, left))  # where the one pass would stop: exactly
                counted = result.counted
                sink.add(result.rows, good)
                merge_reports(report, result.report)
                errors.extend(counted.errors)
                records += counted.records
                good += counted.good
                bar.update(counted.records)
                _show(result.warnings, shown)
                if counted.stopped:
                    break
    finally:
        bar.close()
    return records, errors


def _show(caught: list[tuple[type[Warning], str]], shown: dict[type[Warning], int]) -> None:
    for category, message in caught:
        if issubclass(category, LimitedWarning):
            shown[category] = shown.get(category, 0) + 1
            if shown[category] > category.limit:
                continue
        warnings.warn(message, category, stacklevel=4)
