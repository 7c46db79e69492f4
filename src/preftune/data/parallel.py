"""Work on chunks in several processes, the results taken in order, few chunks in flight.

The workers are forked: each starts with the parent's tokenizer and settings in memory, so only
the chunks and their results cross between processes (a spawned worker would import torch and
transformers again, seconds each). At most ``2 x processes`` chunks are in flight, so reading
never runs ahead of tokenizing by more than that, whatever the source's size.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

C = TypeVar("C")
R = TypeVar("R")

_WORK: Callable[[Any], Any] | None = None
"""The work of the pool being forked: inherited by its workers, never pickled."""


def _start_worker() -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it (and
    # ends the pool), so a worker does not print a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call(chunk: Any) -> Any:
    assert _WORK is not None
    return _WORK(chunk)


def default_processes() -> int:
    """Every core this process may run on, up to 8 (each worker holds a tokenizer)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class Workers(Generic[C, R]):
    """``work(chunk)`` for each chunk of :meth:`map`, in ``processes`` forked workers (in this
    process when 1, or where processes cannot be forked), results yielded in the chunks' order."""

    def __init__(self, work: Callable[[C], R], processes: int):
        self.work = work
        fork = "fork" in multiprocessing.get_all_start_methods()
        self.processes = processes if fork else 1
        self._pool: Any = None

    def __enter__(self) -> Workers[C, R]:
        return self

    def _start(self) -> None:
        global _WORK
        # Tokenizers' own threads cannot survive a fork; a worker tokenizes on one thread
        # (and the library says nothing about it when this is set before the fork).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _WORK = self.work
        self._pool = multiprocessing.get_context("fork").Pool(self.processes, initializer=_start_worker)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _WORK
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        _WORK = None

    def map(self, chunks: Iterable[C]) -> Iterator[tuple[C, R]]:
        """The pool starts at the second chunk: a source of one chunk is not worth a fork."""
        chunks = iter(chunks)
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if first is None:
            return
        if second is None or self.processes <= 1:
            for chunk in (c for c in (first, second) if c is not None):
                yield chunk, self.work(chunk)
            for chunk in chunks:
                yield chunk, self.work(chunk)
            return
        self._start()
        pending: deque[tuple[C, Any]] = deque()
        for chunk in itertools.chain((first, second), chunks):
            pending.append((chunk, self._pool.apply_async(_call, (chunk,))))
            if len(pending) >= 2 * self.processes:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
