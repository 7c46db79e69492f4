"""The one way a source is read: records -> check each -> collect the bad ones (up to a limit) ->
report. Pairs, SFT records, unpaired (KTO) records and the prompts of the sampling commands all
go through :class:`Scan`, so every rule about a record (fields, encodings, empty completions, the
chat-template checks) applies to each of them the same way, and a user sees every bad record at
once rather than the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from ..errors import DataError
from .readers import read_records

T = TypeVar("T")


class TokenizerProblem(DataError):
    """The tokenizer cannot serve the data at all (no EOS, no chat template): no record can be
    read, so the scan stops at once instead of collecting the same error for each."""


def source_name(source: Any) -> str:
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
