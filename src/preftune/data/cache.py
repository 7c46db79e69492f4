"""The tokenized cache: a source's token ids stored once (:mod:`.store`), found again by a
fingerprint of everything that decides them.

    key = sha256(preftune's tokenization version, the kind of examples and its settings,
                 the source's identity (a file's resolved path, size and modification time; a
                 dataset's ``datasets`` fingerprint), the tokenizer (its whole vocabulary, merges,
                 normalizer, pre- and post-processor, special tokens, chat template), the ``data``
                 settings that decide ids, the tokenizers and transformers versions)

A second run, a ``--resume``, another pipeline stage on the same file, ``rm train`` after
``train``: the same key, the same folder, no tokenization. Any change to what decides the ids is
another key. A store is written in a hidden temporary folder and renamed into place when it is
whole, so a killed writer leaves nothing that is ever used; a store whose files do not match
their ``meta.json`` is rebuilt with a notice. Under a launcher the main process tokenizes and
writes; the others wait for it and map the same folder (:func:`tokenized`).

Where: ``data.cache_dir``, else ``$PREFTUNE_CACHE_DIR``, else ``preftune/tokenized`` beside the
Hugging Face caches (``$HF_HOME``, default ``~/.cache/huggingface``). ``preftune cache ls`` and
``preftune cache clear`` list and remove what is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..distributed import on_main, process_group
from ..errors import DataError
from .parallel import default_processes
from .readers import Source
from .report import load_report, save_report
from .scan import Progress, Sink, caught_warnings
from .store import CorruptStore, Examples, Store, Writer

VERSION = 2
"""preftune's tokenization: raised whenever a change to the data rules or to how ids are made
would make an earlier store wrong, so that every earlier store is left unused."""

NOT_IN_KEY = (
    "path",
    "split",
    "eval_path",
    "eval_split",
    "layout",
    "pack_tokens",
    "cache",
    "cache_dir",
    "num_proc",
)
"""``data`` settings that do not decide the ids (the source is keyed by its identity; the layout
arranges ids, it does not make them; the number of processes gives the same ids)."""

TMP = ".tmp-"
"""Folders a writer works in: ``.tmp-<name>@<host>@<pid>``, taken by no run, removed once their
writer is gone."""


def temporary(name: str) -> str:
    return f"{TMP}{name}@{socket.gethostname()}@{os.getpid()}"


@dataclass
class Job:
    """One kind of examples, as the cache sees it: how to scan a source into a sink, how to build
    an example from a store, and the checks a finished scan must pass."""

    kind: str
    """``pairs``, ``sft`` or ``unpaired``: part of the key and of the folder's name."""
    settings: dict[str, Any]
    """What else decides the ids (e.g. SFT's ``completion_only``)."""
    parts: int
    report_type: type
    scan: Callable[[Source, Sink, Progress], tuple[Any, list[DataError]]]
    """``(source, sink, progress) -> (report, errors)``: every record checked, the examples to the sink."""
    item: Callable[[Store, int, str], Any]
    finish: Callable[[Any, list[DataError], str], None]
    """Raises the collected errors (or an empty result) as the one message; warns what it must."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Kept in the store's ``meta.json`` beside what every store keeps."""
    complete: Callable[[Path, Source], None] | None = None
    """Adds to a found store what this run needs and its key leaves out (a column of margins)."""


def cache_root(cfg: DataConfig | None = None) -> Path:
    """Where tokenized stores live: ``data.cache_dir``, ``$PREFTUNE_CACHE_DIR``, or
    ``$HF_HOME/preftune/tokenized`` (``~/.cache/huggingface/preftune/tokenized``)."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("PREFTUNE_CACHE_DIR"):
        return Path(os.environ["PREFTUNE_CACHE_DIR"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "preftune" / "tokenized"


def tokenizer_digest(tokenizer: Any) -> str:
    """Everything of a tokenizer that decides ids: a fast tokenizer's whole definition (vocabulary,
    merges, normalizer, pre-tokenizer, post-processor with its BOS, decoder, added tokens), its
    special tokens and chat template; a slow one's vocabulary and settings."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = {i: str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    digest.update(
        json.dumps(
            [
                tokenizer.chat_template,
                {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                sorted(added.items()),
                [tokenizer.bos_token_id, tokenizer.eos_token_id],
                getattr(tokenizer, "add_bos_token", None),
                getattr(tokenizer, "add_eos_token", None),
            ],
            default=str,
        ).encode()
    )
    return digest.hexdigest()


def fingerprint(job: Job, identity: dict[str, Any], tokenizer: Any, cfg: DataConfig) -> str:
    import tokenizers
    import transformers

    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    parts = {
        "version": VERSION,
        "kind": job.kind,
        "settings": job.settings,
        "source": identity,
        "tokenizer": tokenizer_digest(tokenizer) if tokenizer is not None else None,
        "data": data,
        "libraries": [tokenizers.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def processes(cfg: DataConfig) -> int:
    return cfg.num_proc or default_processes()


# --------------------------------------------------------------------------- one source, tokenized


def tokenized(job: Job, source: Source, tokenizer: Any, cfg: DataConfig, progress: bool) -> tuple[Any, Any]:
    """``(examples, report)`` of ``source``: from its store when one matches, else scanned (and,
    for a source with an identity, stored). Under a launcher the main process alone scans and
    writes; the others map its store once it is published."""
    if tokenizer is None or isinstance(source.source, list):  # records already in memory
        return _in_memory(job, source, progress)
    root = cache_root(cfg)
    if not _writable(root):
        print(f"data: {root} cannot be written; tokenizing in memory (set data.cache_dir to keep the ids)")
        return _in_memory(job, source, progress)
    identity = source.identity() if cfg.cache else None
    if identity is None:  # nothing to key a store on (or data.cache=false): a store for this run only
        return _unnamed(job, source, progress, cfg)
    key = f"{job.kind}-{fingerprint(job, identity, tokenizer, cfg)}"
    rank, _ = process_group()

    def publish(folder: Path, show: bool) -> tuple[str, bool]:
        folder, built = find_or_build(folder, lambda tmp: _build(job, source, tmp, show, cfg), say=print)
        if job.complete is not None:
            job.complete(folder, source)
        return str(folder), built

    path, built = on_main(lambda: publish(root / key, progress), DataError)
    folder = Path(path)
    if not folder.exists():  # another machine's main process wrote it: this one builds its own
        path, built = publish(folder, False)
        folder = Path(path)
    return _open(job, folder, key, source.name, replay=rank == 0, built=built)


def _in_memory(job: Job, source: Source, progress: bool) -> tuple[list[Any], Any]:
    collected = Collected(job.parts)
    report, errors = job.scan(source, collected, Progress(progress))
    job.finish(report, errors, source.name)
    return collected.examples(job.item, source.name), report


def _unnamed(job: Job, source: Source, progress: bool, cfg: DataConfig) -> tuple[Examples[Any], Any]:
    """A store this run alone maps: built, opened, and its folder removed at once (the mapped
    files live on until the run ends), so memory stays flat without keeping anything on disk."""
    folder = cache_root(cfg) / temporary(f"{job.kind}-unnamed")
    try:
        _build(job, source, folder, progress, cfg)
        store = Store.open(folder)
        report: Any = load_report(job.report_type, store.meta["report"], folder)
    finally:
        _remove(folder)
    report.cache = f"tokenized {_how(store.meta)}; token ids kept until the run ends"
    return Examples(store, job.item, source.name, None), report


def _how(meta: dict[str, Any]) -> str:
    seconds, records = meta.get("seconds", 0.0), meta.get("records", 0)
    rate = records / max(seconds, 1e-9)
    return (
        f"{records} records in {seconds:.1f} s ({rate:.0f} records/s, {meta.get('processes', 1)} processes)"
    )


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK | os.X_OK)


def _build(job: Job, source: Source, folder: Path, progress: bool, cfg: DataConfig) -> None:
    writer = Writer(folder, job.parts)
    shown = Progress(progress)
    try:
        (report, errors), caught = caught_warnings(lambda: job.scan(source, writer, shown))
    finally:
        writer.close()
    for category, message in caught:
        warnings.warn(message, category, stacklevel=2)
    job.finish(report, errors, source.name)
    meta = {
        **job.meta,
        "kind": job.kind,
        "source": source.name,
        "records": report.records,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(shown.seconds, 2),
        "processes": processes(cfg),
        "report": save_report(report, folder),
        "warnings": [[f"{c.__module__}.{c.__qualname__}", m] for c, m in caught],
    }
    writer.finish(meta)


def _open(
    job: Job, folder: Path, key: str, name: str, replay: bool, built: bool
) -> tuple[Examples[Any], Any]:
    store = Store.open(folder)
    report: Any = load_report(job.report_type, store.meta["report"], folder)
    report.findings.renamed(store.source_name, name)
    if replay and not built:  # what a fresh scan warned, warned again
        for category, message in store.meta.get("warnings", []):
            warnings.warn(message, _category(category), stacklevel=3)
        job.finish(report, [], name)
    how = _how(store.meta)
    report.cache = (
        f"tokenized {how}; token ids kept in {folder}"
        if built
        else f"token ids reused from {folder} (tokenized {store.meta['created']}: {how})"
    )
    return Examples(store, job.item, name, key), report


def _category(name: str) -> type[Warning]:
    import importlib

    module, _, qualname = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError):
        return UserWarning
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


# --------------------------------------------------------------------------- the folder


def find_or_build(
    folder: Path, build: Callable[[Path], None], say: Callable[[str], None]
) -> tuple[Path, bool]:
    """``(folder, built)``: ``folder`` when it holds a whole store; else a store built into a
    temporary folder beside it and renamed into place (a store another process published first
    is taken instead)."""
    if folder.exists():
        try:
            Store.open(folder)
            return folder, False
        except CorruptStore as err:
            say(f"data: the tokenized store {folder} is damaged ({err}); tokenizing again")
            _remove(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(folder.parent)
    tmp = folder.with_name(temporary(folder.name))
    _remove(tmp)
    try:
        build(tmp)
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        _remove(tmp)  # failed, or another process published first
    return folder, True


def _remove(path: Path) -> None:
    """A folder removed; renamed aside first, so a half-removed one is never taken for a store."""
    if not path.exists():
        return
    aside = path.with_name(temporary(f"removed-{path.name.removeprefix(TMP).split('@')[0]}"))
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def clear_stale(root: Path) -> None:
    """Temporary folders of writers on this machine that no longer run (killed mid-write)."""
    host = socket.gethostname()
    for path in root.glob(f"{TMP}*"):
        owner = path.name.rsplit("@", 2)
        if len(owner) == 3 and owner[1] == host and owner[2].isdigit() and not _alive(int(owner[2])):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def listing(root: Path) -> list[dict[str, Any]]:
    """Every store under ``root``: its folder, kind, source, examples, size and when it was made
    (a damaged one with ``error`` set)."""
    rows = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(TMP)):
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        row: dict[str, Any] = {"name": folder.name, "path": str(folder), "bytes": size}
        try:
            meta = Store.open(folder).meta
            row.update(
                kind=meta["kind"], source=meta["source"], examples=meta["rows"], created=meta["created"]
            )
        except CorruptStore as err:
            row["error"] = str(err)
        rows.append(row)
    return rows


def clear(root: Path, names: list[str] | None = None) -> list[str]:
    """Remove the named stores (all, and every temporary folder of a writer that is gone, when
    ``names`` is empty); returns what was removed. A run using a store keeps reading it."""
    removed = []
    for folder in sorted(root.glob("*")) if root.exists() else []:
        if not folder.is_dir() or (names and folder.name not in names):
            continue
        if folder.name.startswith(TMP):
            continue
        _remove(folder)
        removed.append(folder.name)
    if not names and root.exists():
        clear_stale(root)
    missing = sorted(set(names or ()) - set(removed))
    if missing:
        raise DataError(f"{root}: no tokenized store named {', '.join(missing)} (preftune cache ls)")
    return removed


class Collected:
    """A sink that keeps the chunks in memory (a source with no identity to key a store on)."""

    def __init__(self, parts: int):
        self.parts = parts
        self.chunks: list[dict[str, Any]] = []

    def add(self, arrays: dict[str, Any], base: int = 0) -> None:
        self.chunks.append({**arrays, "index": arrays["index"] + base})

    def examples(self, item: Callable[[Store, int, str], Any], name: str) -> list[Any]:
        store = Store.from_arrays(self.chunks, self.parts, name)
        return list(Examples(store, item, name, None))
