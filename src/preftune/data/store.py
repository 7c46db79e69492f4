"""Token ids on disk, mapped into memory rather than read: the tokenized store.

A store is a folder of flat arrays, one file per column, and ``meta.json``:

    tokens     uint32   every example's token ids end to end (a pair: prompt, chosen, rejected)
    parts      int32    [N, K] the length of each of an example's K parts
    offsets    int64    [N + 1] where each example starts in ``tokens``
    mask       uint8    SFT's loss mask, beside ``tokens``
    index      int64    [N] the example's position in its source (stable across runs)
    where      uint8    the ``file:line`` texts end to end, ``where_offsets`` [N + 1] beside them
    margin     float64  [N] a reward model's margin; desirable  bool  [N] KTO's label

A run opens the files with ``numpy.memmap``: an example is built when it is drawn
(:class:`Examples`, a lazy ``Sequence``), so memory does not grow with the dataset and a dataset
larger than RAM trains; only per-example lengths are ever read whole. Writing goes a chunk at a
time (:class:`Writer`), so no list of every example exists either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import numpy as np

from ..errors import DataError

FORMAT = 1
"""The layout of the files; a store of another format is rebuilt."""

DTYPES: dict[str, Any] = {
    "tokens": np.uint32,
    "parts": np.int32,
    "mask": np.uint8,
    "index": np.int64,
    "where": np.uint8,
    "where_len": np.int32,
    "margin": np.float64,
    "desirable": np.bool_,
}
RAGGED = {"tokens": "offsets", "where": "where_offsets"}
"""Flat columns and the offsets column written for each when the store is finished."""

T = TypeVar("T")


class CorruptStore(DataError):
    """A store whose files do not match its ``meta.json`` (a disk error, a file removed by hand)."""


class Rows:
    """A chunk of examples in columns, as a worker hands them back (compact to pickle)."""

    def __init__(self, parts: int, mask: bool = False):
        self.parts = parts
        self.tokens: list[int] = []
        self.lengths: list[int] = []
        self.mask: list[int] | None = [] if mask else None
        self.index: list[int] = []
        self.where: list[str] = []
        self.values: dict[str, list[Any]] = {}

    def add(
        self, parts: Sequence[list[int]], index: int, where: str, mask: list[int] | None = None, **values: Any
    ) -> None:
        for part in parts:
            self.tokens += part
            self.lengths.append(len(part))
        if self.mask is not None and mask is not None:
            self.mask += mask
        self.index.append(index)
        self.where.append(where)
        for name, value in values.items():
            self.values.setdefault(name, []).append(value)

    def __len__(self) -> int:
        return len(self.index)

    def arrays(self) -> dict[str, np.ndarray]:
        wheres = [w.encode("utf-8", "surrogatepass") for w in self.where]
        out = {
            "tokens": np.array(self.tokens, dtype=DTYPES["tokens"]),
            "parts": np.array(self.lengths, dtype=DTYPES["parts"]).reshape(-1, self.parts),
            "index": np.array(self.index, dtype=DTYPES["index"]),
            "where": np.frombuffer(b"".join(wheres), dtype=np.uint8),
            "where_len": np.array([len(w) for w in wheres], dtype=DTYPES["where_len"]),
        }
        if self.mask is not None:
            out["mask"] = np.array(self.mask, dtype=DTYPES["mask"])
        for name, values in self.values.items():
            out[name] = np.array(values, dtype=DTYPES[name])
        return out


class Writer:
    """Columns appended a chunk at a time to files in ``folder``; :meth:`finish` writes the
    offsets and ``meta.json`` (last, so a folder without it is not a store)."""

    def __init__(self, folder: Path, parts: int):
        self.folder = folder
        self.parts = parts
        self.rows = 0
        self.lengths: dict[str, int] = {}
        self._files: dict[str, Any] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, arrays: dict[str, np.ndarray], base: int = 0) -> None:
        """One chunk's columns; ``base`` is added to its (chunk-local) indices."""
        try:
            self._add(arrays, base)
        except OSError as err:  # a full disk: one line the user can act on
            raise DataError(
                f"{self.folder.parent}: could not write the tokenized store ({err.strerror or err}); free "
                "space, set data.cache_dir to another folder, or data.cache=false"
            ) from None

    def _add(self, arrays: dict[str, np.ndarray], base: int) -> None:
        for name, array in arrays.items():
            if name == "index":
                array = array + base
            handle = self._files.get(name)
            if handle is None:
                handle = self._files[name] = (self.folder / f"{name}.bin").open("wb")
                self.lengths[name] = 0
            handle.write(np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes())
            self.lengths[name] += array.size
        self.rows += len(arrays["index"])

    def finish(self, meta: dict[str, Any]) -> None:
        for handle in self._files.values():
            handle.close()
        columns = {name: [length] for name, length in self.lengths.items()}
        if "parts" in columns:
            columns["parts"] = [self.rows, self.parts]
        for flat, offsets_name in RAGGED.items():
            lengths = _open(self.folder, "parts" if flat == "tokens" else "where_len", columns)
            if lengths is None:
                continue
            (self.folder / f"{offsets_name}.bin").write_bytes(_offsets(lengths).tobytes())
            columns[offsets_name] = [self.rows + 1]
        meta = {**meta, "format": FORMAT, "rows": self.rows, "columns": columns}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """``[N + 1]`` where each row starts, from ``[N]`` or ``[N, K]`` lengths (a row's parts end to end)."""
    per_row = lengths.sum(axis=1, dtype=np.int64) if lengths.ndim == 2 else lengths.astype(np.int64)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(per_row)])


def _dtype(name: str) -> Any:
    return np.int64 if name in RAGGED.values() else DTYPES[name]


def _open(folder: Path, name: str, columns: dict[str, list[int]]) -> np.ndarray | None:
    """A column mapped read-only (an empty one as an empty array: a file of 0 bytes cannot be mapped)."""
    if name not in columns:
        return None
    shape = tuple(columns[name])
    path = folder / f"{name}.bin"
    dtype = np.dtype(_dtype(name))
    expected = int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != expected:
        raise CorruptStore(f"{path}: {size} bytes where {expected} were written")
    if expected == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class Store:
    """An opened store: its metadata and its columns (mapped from files, or arrays in memory)."""

    def __init__(self, columns: dict[str, np.ndarray], meta: dict[str, Any], folder: Path | None = None):
        self.columns = columns
        self.meta = meta
        self.folder = folder
        self.rows = int(meta["rows"])
        self.source_name: str = meta.get("source", "")

    @classmethod
    def open(cls, folder: Path) -> Store:
        """The store in ``folder``, its files checked against ``meta.json``."""
        try:
            meta: dict[str, Any] = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            columns = meta["columns"]
            int(meta["rows"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CorruptStore(f"{folder}: no readable meta.json ({type(err).__name__}: {err})") from None
        if meta.get("format") != FORMAT:
            raise CorruptStore(f"{folder}: format {meta.get('format')}, this preftune writes {FORMAT}")
        mapped = {name: _open(folder, name, columns) for name in columns}
        offsets, tokens = mapped.get("offsets"), mapped.get("tokens")
        if offsets is not None and tokens is not None and int(offsets[-1]) != len(tokens):
            raise CorruptStore(
                f"{folder}: the offsets end at {int(offsets[-1])}, the tokens at {len(tokens)}"
            )
        return cls({k: v for k, v in mapped.items() if v is not None}, meta, folder)

    @classmethod
    def from_arrays(cls, chunks: list[dict[str, np.ndarray]], parts: int, name: str) -> Store:
        """A store held in memory, from chunks of :meth:`Rows.arrays` (indices already shifted)."""
        names = {k for chunk in chunks for k in chunk}
        columns = {k: np.concatenate([c[k] for c in chunks if k in c]) for k in names}
        if "parts" not in columns:
            columns["parts"] = np.zeros((0, parts), np.int32)
        rows = len(columns.get("index", ()))
        for flat, offsets_name in RAGGED.items():
            lengths = columns.get("parts" if flat == "tokens" else "where_len")
            if lengths is not None:
                columns[offsets_name] = _offsets(lengths)
        return cls(columns, {"rows": rows, "source": name})

    def sidecar(self, name: str) -> np.ndarray | None:
        """A per-example float64 column added to the store after it was published (a reward
        model's margins), mapped; None when it is not there (or not whole)."""
        if name not in self.columns and self.folder is not None:
            path = self.folder / f"{name}.bin"
            if self.rows and path.exists() and path.stat().st_size == 8 * self.rows:
                self.columns[name] = np.memmap(path, dtype=np.float64, mode="r", shape=(self.rows,))
        return self.columns.get(name)

    def column(self, name: str) -> np.ndarray:
        array = self.columns.get(name)
        if array is None:
            raise KeyError(name)
        return array

    def ids(self, i: int) -> tuple[list[int], list[int]]:
        """Example ``i``'s token ids (its parts end to end) and its part lengths."""
        start, end = self.column("offsets")[i : i + 2]
        return self.column("tokens")[start:end].tolist(), self.column("parts")[i].tolist()

    def mask(self, i: int) -> list[int]:
        start, end = self.column("offsets")[i : i + 2]
        return self.column("mask")[start:end].tolist()

    def where(self, i: int, name: str) -> str:
        """Where example ``i`` came from, named after the source as this run gives it."""
        start, end = self.column("where_offsets")[i : i + 2]
        text = self.column("where")[start:end].tobytes().decode("utf-8", "surrogatepass")
        old = self.source_name
        if old and name and old != name and text.startswith(old):
            return name + text[len(old) :]
        return text


def split_parts(ids: list[int], parts: list[int]) -> list[list[int]]:
    out, start = [], 0
    for length in parts:
        out.append(ids[start : start + length])
        start += length
    return out


class Examples(Sequence[T], Generic[T]):
    """A store's examples as a lazy sequence: ``examples[i]`` builds example ``i`` from the mapped
    columns (``item(store, i, name)``); nothing else is held. ``fingerprint`` names the ids (the
    cache key; None for a store of one run), so what is computed from them (the reference's
    log-probs) can key on it."""

    def __init__(
        self, store: Store, item: Callable[[Store, int, str], T], name: str, fingerprint: str | None
    ):
        self.store = store
        self.item = item
        self.name = name
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return self.store.rows

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.item(self.store, i, self.name)

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self)):
            yield self.item(self.store, i, self.name)

    def __add__(self, other: Sequence[T]) -> Joined[T]:
        return Joined([self, other])

    def __radd__(self, other: Sequence[T]) -> Joined[T]:
        return Joined([other, self])

    @property
    def lengths(self) -> np.ndarray:
        """``[N, K]`` each example's part lengths, read without building an example."""
        return np.asarray(self.store.column("parts"))

    @property
    def indices(self) -> np.ndarray:
        return np.asarray(self.store.column("index"))


class Joined(Sequence[T], Generic[T]):
    """Sequences one after the other (training pairs then eval pairs), still lazy."""

    def __init__(self, parts: list[Sequence[T]]):
        self.parts: list[Sequence[T]] = []
        for part in parts:
            self.parts += part.parts if isinstance(part, Joined) else [part]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]

    def __add__(self, other: Sequence[T]) -> Joined[T]:
        return Joined([self, other])

    def __radd__(self, other: Sequence[T]) -> Joined[T]:
        return Joined([other, self])

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(ids_fingerprint(part).encode())
        return digest.hexdigest()[:32]


def ids_fingerprint(examples: Sequence[Any]) -> str:
    """A digest of the examples' token ids: a store's own key, or every example's ids hashed
    (examples held in memory)."""
    known = getattr(examples, "fingerprint", None)
    if isinstance(known, str):
        return known
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.index, e.prompt_ids, e.chosen_ids, e.rejected_ids]).encode())
    return digest.hexdigest()[:32]


def pair_lengths(pairs: Sequence[Any]) -> np.ndarray:
    """``[N]`` each pair's prompt + longer completion, read from a store's lengths when it has them."""
    lengths = getattr(pairs, "lengths", None)
    if isinstance(lengths, np.ndarray):
        return lengths[:, 0] + lengths[:, 1:].max(axis=1)
    if isinstance(pairs, Joined):
        return np.concatenate([pair_lengths(part) for part in pairs.parts]).astype(np.int64)
    return np.array(
        [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], dtype=np.int64
    )


def pair_indices(pairs: Sequence[Any]) -> np.ndarray:
    """``[N]`` each pair's dataset index."""
    indices = getattr(pairs, "indices", None)
    if isinstance(indices, np.ndarray):
        return indices
    if isinstance(pairs, Joined):
        return np.concatenate([pair_indices(part) for part in pairs.parts]).astype(np.int64)
    return np.array([p.index for p in pairs], dtype=np.int64)
