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
import re
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
        """The local file, or None for a hub name or a dataset folder (``datasets`` reads both, a
        configuration after a colon); a path that cannot be one is refused."""
        source = self.source
        path = Path(source).expanduser()
        if path.is_file():
            return path
        named = Path(str(source).split(":")[0]).expanduser()  # a folder or hub name, before any :config
        if named.is_dir() and any(named.iterdir()):  # a dataset folder, read by `datasets`
            return None
        if path.is_dir():
            raise DataError(f"{source}: is a folder; name a .jsonl, .json, .csv or .parquet file")
        looks_local = named.suffix.lower() in SUFFIXES or (named.suffix and "/" not in str(source))
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
    """A hub dataset or a dataset folder, as TRL's scripts load one: ``name:config`` names its
    configuration, the split may be sliced (``train[:1%]``, ``train[10:20]``), and ``stream:train``
    iterates the split as ``datasets`` streams it, never downloading or preparing the whole set (a
    stream has no fingerprint: its tokens go to a store of the run alone). A folder written by
    ``save_to_disk`` is read with ``load_from_disk``."""
    import datasets

    path, _, config = name.partition(":")
    named = {"name": config} if config else {}
    streaming, split_spec = split.startswith("stream:"), split.removeprefix("stream:")
    try:
        if (Path(path) / "dataset_dict.json").is_file() or (Path(path) / "state.json").is_file():
            saved = datasets.load_from_disk(path)
            base, start, stop = _slice(split_spec, streaming=False)
            part = saved[base] if isinstance(saved, datasets.DatasetDict) else saved
            return part.select(range(len(part))[_at(start, len(part)) : _at(stop, len(part))])
        if streaming:
            base, start, stop = _slice(split_spec, streaming=True)
            first = int(start or 0)
            stream = datasets.load_dataset(path, split=base, streaming=True, **named).skip(first)
            return stream if stop is None else stream.take(max(0, int(stop) - first))
        return datasets.load_dataset(path, split=split_spec, **named)
    except Exception as err:  # the library raises many types; the user needs one message
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name}: could not load dataset (split '{split}'): {reason}") from None


def _slice(spec: str, streaming: bool) -> tuple[str, str | None, str | None]:
    """``train[10:20]`` -> ``("train", "10", "20")``; a stream's length is unknown, so it takes no percent."""
    match = re.fullmatch(r"([\w.-]+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?", spec)
    bounds = "".join(b for b in (match.groups()[1:] if match else ()) if b)
    if match is None or (streaming and ("%" in bounds or "-" in bounds)):
        length = " counted in records from the start (a stream has no length)" if streaming else ""
        raise ValueError(f"expected SPLIT or SPLIT[START:STOP]{length}")
    return match.group(1), match.group(2), match.group(3)


def _at(bound: str | None, length: int) -> int | None:
    if bound is None:
        return None
    return round(length * int(bound[:-1]) / 100) if bound.endswith("%") else int(bound)
