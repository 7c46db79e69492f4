"""Records from files, in-memory datasets, lists of dicts or the hub, each with where it came from.

Every record comes as ``(where, record)``: ``where`` is ``file:line`` (or ``dataset row N``),
so any later problem with it names the place a user can open. A source is read as a stream: a
JSONL line is parsed when its turn comes (in a worker process when tokenization runs in several,
:class:`RawLine`), a Parquet file batch by batch, a hub dataset from ``datasets``' memory-mapped
Arrow files; no reader holds the records of a whole file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import DataError, json_problem


class RawLine(NamedTuple):
    """A JSONL line as read, parsed by :func:`parse_line` where it is checked."""

    path: str
    line: int
    data: bytes


Item = tuple[str, "dict[str, Any] | RawLine"]
"""``(where, record)``, the record possibly still a :class:`RawLine`."""


class Source:
    """A source of records (a file, a hub dataset name, a ``datasets.Dataset``, a list of dicts),
    opened once: :meth:`items` reads it, :meth:`identity` says what decides its contents."""

    def __init__(self, source: Any, split: str = "train"):
        self.source = source
        self.split = split
        self._dataset: Any = None

    @property
    def name(self) -> str:
        if isinstance(self.source, str | Path):
            return str(self.source)
        return "records" if isinstance(self.source, list) else "dataset"

    def _path(self) -> Path | None:
        """The local file, or None for a hub name; a path that cannot be one is refused."""
        source = self.source
        path = Path(source).expanduser()
        if path.is_dir():
            raise DataError(f"{source}: is a folder; name a .jsonl, .json, .csv or .parquet file")
        if path.is_file():
            return path
        looks_local = path.suffix.lower() in SUFFIXES or (path.suffix and "/" not in str(source))
        if looks_local or str(source).startswith((".", "/", "~")) or str(source).count("/") >= 2:
            raise DataError(f"{source}: no such file")
        return None

    def _hub(self) -> Any:
        if self._dataset is None:
            self._dataset = _load_hub(str(self.source), self.split)
        return self._dataset

    def identity(self) -> dict[str, Any] | None:
        """What the records are, for a cache key: a local file's resolved path, size and modification
        time; a dataset's ``datasets`` fingerprint (one backed by Arrow files: a hub dataset, or one
        loaded from files). None: a source with no stable identity (a list, an in-memory dataset)."""
        if isinstance(self.source, list):
            return None
        if isinstance(self.source, str | Path):
            path = self._path()
            if path is not None:
                stat = path.stat()
                return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            return _dataset_identity(self._hub(), self.split)
        return _dataset_identity(self.source, None)

    def items(self) -> Iterator[Item]:
        """``(where, record)`` of every record, a JSONL line as a :class:`RawLine` (the other
        formats are parsed here)."""
        source = self.source
        if isinstance(source, list):
            for i, record in enumerate(source):
                yield f"record {i}", record
            return
        if not isinstance(source, str | Path):
            # A datasets.Dataset (or anything indexable that yields dicts).
            for i, record in enumerate(source):
                yield f"dataset row {i}", dict(record)
            return
        path = self._path()
        if path is None:
            for i, record in enumerate(self._hub()):
                yield f"{source}[{self.split}] row {i}", dict(record)
        elif path.suffix.lower() == ".jsonl":
            with path.open("rb") as handle:
                for line_no, data in enumerate(handle, start=1):
                    yield f"{path}:{line_no}", RawLine(str(path), line_no, data)
        else:
            yield from _read_file(path)


def _dataset_identity(dataset: Any, split: str | None) -> dict[str, Any] | None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint or not getattr(dataset, "cache_files", None):
        return None  # in memory: its fingerprint may be random
    return {"dataset": fingerprint, "split": split, "rows": len(dataset)}


def read_records(
    source: Any, split: str = "train", errors: list[DataError] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` from a file, an in-memory ``datasets.Dataset``, a list of dicts
    or a hub dataset name (through ``datasets.load_dataset``).

    A line of a JSONL file that cannot be read (not UTF-8, malformed JSON, not an object) is
    raised as a :class:`DataError` naming ``file:line`` — or, when ``errors`` is a list,
    appended to it and skipped, so that every bad line can be reported together.
    """
    for where, record in Source(source, split).items():
        if not isinstance(record, RawLine):
            yield where, record
            continue
        try:
            parsed = parse_line(record)
        except DataError as err:
            if errors is None:
                raise
            errors.append(err)
            continue
        if parsed is not None:
            yield where, parsed


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _decode(data: bytes, path: Path, line_no: int | None = None) -> str:
    """UTF-8 (a leading byte-order mark is dropped, in every format), or an error naming the line."""
    try:
        return data.decode("utf-8-sig" if line_no in (None, 1) else "utf-8")
    except UnicodeDecodeError as err:
        line = line_no or data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1 if line_no is None else err.start + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text ({err.reason} at byte {column} of the line)"
        ) from None


def parse_line(raw: RawLine) -> dict[str, Any] | None:
    """The record of a JSONL line; None for a blank line; a :class:`DataError` naming
    ``file:line`` when it is not UTF-8, not JSON, or not an object."""
    line = _decode(raw.data, Path(raw.path), raw.line)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{raw.path}:{raw.line}: malformed JSON ({json_problem(err)})") from None
    if not isinstance(record, dict):
        raise DataError(f"{raw.path}:{raw.line}: expected a JSON object, got {_kind(record)}")
    return record


def _kind(value: Any) -> str:
    return {list: "a JSON array", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def _read_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = _decode(path.read_bytes(), path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON ({json_problem(err)})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a JSON list of objects (or {{'data': [...]}}), got {_kind(data)}"
            )
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object, got {_kind(record)}")
            yield f"{path}: item {i}", record
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_decode(path.read_bytes(), path), newline=""))
        for row in reader:
            if None in row:  # more cells than the header names
                raise DataError(f"{path}:{reader.line_num}: more values than the header has columns")
            yield f"{path}:{reader.line_num}", dict(row)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
            i = 0
            for batch in batches:  # batch by batch: a large file is never held whole
                for record in batch.to_pylist():
                    yield f"{path}: row {i}", record
                    i += 1
        except Exception as err:  # pyarrow's own error types: the user needs one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: not a readable Parquet file ({reason})") from None
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # the library raises many types; the user needs one message
        raise DataError(f"{name}: could not load dataset (split '{split}'): {err}") from None
