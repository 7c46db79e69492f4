"""Where a command writes: checked before any work, and held by one run at a time.

Every command that writes (``train``, ``sft``, ``rm train``, ``online``, ``ppo``, ``eval``,
``pipeline run``, ``rm score``) checks its output before it reads a model or a record:

* the output can be written (a folder where a folder is meant, a file where a file is meant, and
  a parent the user may write to);
* the output is none of the run's inputs: not the same path as a model, data file or reward
  folder the run reads, not inside one, and not containing one (``train --model base --output
  base`` would write the run's ``config.json`` over the model's own);
* an output folder holds one kind of run (:data:`RUN_FILE` records it): a ``train`` run never
  resumes or overwrites an ``online`` run, nor the other way round.

A run then holds a lock on its folder (:class:`FolderLock`, ``.preftune.lock``) until it ends, so a
second run started into the same folder is refused instead of interleaving with the first.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError

LOCK_FILE = ".preftune.lock"
RUN_FILE = "run.json"
"""``{"kind": ...}``: the kind of run a folder holds, written with the run's first files."""

KINDS = {
    "train": "a train run (preftune train)",
    "sft": "an sft run (preftune sft)",
    "rm": "a reward-model run (preftune rm train)",
    "online": "an online run (preftune online)",
    "ppo": "a ppo run (preftune ppo)",
    "eval": "an eval report (preftune eval)",
    "pipeline": "a pipeline (preftune pipeline run)",
    "hf-trainer": "a Hugging Face Trainer run (its checkpoint-N folders hold training_args.bin)",
    "training": "a training run (train, sft, rm train or ppo)",
}
TRAINING_KINDS = ("train", "sft", "rm", "ppo")
"""The kinds of run that a folder written before the kind was recorded may hold, when it holds
checkpoints or ``final/``."""

INPUT_KEYS = (
    "model.name_or_path",
    "data.path",
    "data.eval_path",
    "data.chat_template",
    "reference.path",
    "prompts.path",
    "reward.scorer",
    "ppo.value_model",
)
"""The config keys that may name a local file or folder a run reads."""


# --------------------------------------------------------------------------- checks, before any work


def _nearest_existing(path: Path) -> Path:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_output_dir(output: Path, key: str = "train.output_dir") -> None:
    """The output folder can be a folder and can be written."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{key}: {output} is a file, not a folder")
    existing = _nearest_existing(output)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {output} cannot be written (read-only or no permission on {existing})")


def check_output_file(output: Path, key: str) -> None:
    """The output file can be written in place: not a folder, its folder writable."""
    if output.is_dir():
        raise ConfigError(f"{key}: {output} is a folder; name the file to write")
    existing = _nearest_existing(output.parent)
    if not existing.is_dir():
        raise ConfigError(f"{key}: {output} cannot be written ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {output} cannot be written (read-only or no permission on {existing})")


def local_path(value: Any) -> Path | None:
    """The local file or folder ``value`` names (``file.py:function`` names its file), if it exists."""
    if not isinstance(value, str | Path) or not str(value):
        return None
    text = str(value)
    for candidate in (text, text.rpartition(":")[0]):
        try:
            if candidate and Path(candidate).exists():
                return Path(candidate)
        except (OSError, ValueError):  # not a path at all (a chat template's text, say)
            continue
    return None


def config_inputs(config: Any) -> dict[str, Any]:
    """The values of :data:`INPUT_KEYS` in a run's config, by key."""
    values = {}
    for key in INPUT_KEYS:
        section, name = key.split(".")
        values[key] = getattr(getattr(config, section), name)
    return values


def check_not_input(output: Path, inputs: Mapping[str, Any], key: str) -> None:
    """``output`` is none of ``inputs`` (name -> path), is inside none and contains none of them."""
    out = output.resolve()
    for name, value in inputs.items():
        path = local_path(value)
        if path is None:
            continue
        source = path.resolve()
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "is inside"
        elif out in source.parents:
            relation = "contains"
        else:
            continue
        raise ConfigError(
            f"{key}: {output} {relation} the input {name} ({value}); a run never writes where it reads: "
            "choose another output"
        )


# --------------------------------------------------------------------------- the kind of run a folder holds


STAGE_KINDS = {"sft": "sft", "rm": "rm", "dpo": "train", "online": "online", "ppo": "ppo", "eval": "eval"}
"""A pipeline stage's kind (``stage.json``) -> the kind of run its folder holds."""


def recorded_kind(folder: Path) -> str | None:
    """The kind of run ``folder`` holds: its :data:`RUN_FILE`, else what its files show (folders
    written before the record existed), else None (empty, or nothing says)."""
    for name, read in ((RUN_FILE, lambda k: k), ("stage.json", STAGE_KINDS.get)):
        with contextlib.suppress(ValueError, OSError, AttributeError, TypeError):
            kind = read(json.loads((folder / name).read_text()).get("kind"))
            if isinstance(kind, str):
                return kind
    if not folder.is_dir():
        return None
    checkpoints = list(folder.glob("checkpoint-*"))
    if any((c / "training_args.bin").is_file() for c in checkpoints):
        return "hf-trainer"
    if (folder / "rounds.jsonl").is_file() or any(folder.glob("round-*")):
        return "online"
    if (folder / "eval.json").is_file():
        return "eval"
    if (folder / "summary.json").is_file():
        return "pipeline"
    if any((c / "value").is_dir() for c in checkpoints):
        return "ppo"
    if checkpoints or (folder / "final").is_dir():
        return "training"  # train, sft, rm train or ppo: their files alone do not say which
    return None


def check_kind(folder: Path, kind: str, key: str) -> None:
    """Refuse a folder that holds another kind of run, naming both."""
    found = recorded_kind(folder)
    if found is None or found == kind or (found == "training" and kind in TRAINING_KINDS):
        return
    held = KINDS.get(found, f"a {found} run")
    raise ConfigError(
        f"{key}: {folder} holds {held}; this is {KINDS.get(kind, kind)}: a folder holds one kind of run, "
        "so neither --resume nor train.overwrite applies; choose another output"
    )


def record_kind(folder: Path, kind: str) -> None:
    """Write ``folder``'s :data:`RUN_FILE` (once: a folder keeps its kind)."""
    record = folder / RUN_FILE
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


# --------------------------------------------------------------------------- one run per folder


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), to tell it from a later
    process given the same pid; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process a lock file names still runs (on this host; another host's cannot be
    checked, and counts as alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it runs
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


_HELD: list[FolderLock] = []
"""The locks this process holds, oldest first (all released at exit, at the latest)."""


class FolderLock:
    """``FOLDER/.preftune.lock``, held while a run writes into ``FOLDER``.

    The lock is an exclusive ``flock`` on the file, which the operating system drops when the
    process ends, however it ends (``kill -9`` included); the file names the holder (pid, host,
    process start, kind) for the message a second run prints. A lock file nobody holds is left by
    a run that ended, and is taken over. Where the file system takes no locks, the names decide: a
    pid that no longer runs on this host (or runs a later process) is a stale lock.
    """

    def __init__(self, folder: Path, kind: str, key: str):
        self.folder, self.kind, self.key = folder, kind, key
        self.path = folder / LOCK_FILE
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> FolderLock:
        """Hold the lock, or refuse naming the run that holds it. Creates the folder if needed
        (removed again at :meth:`release` when the run left it empty)."""
        mine = self.folder.resolve()
        if any(lock.folder.resolve() == mine for lock in _HELD):
            raise ConfigError(f"{self.key}: {self.folder} is in use by another run of this process")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be removed between our open and our lock: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _flock(fd)
            holder = _read_holder(fd)
            if locked is False or (locked is None and holder.get("pid") != os.getpid() and _alive(holder)):
                os.close(fd)
                self._refuse(holder)
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:
            raise ConfigError(f"{self.key}: {self.folder}: could not take the lock {self.path}")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid())}
        me |= {"kind": self.kind, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        _HELD.append(self)
        return self

    def _refuse(self, holder: dict[str, Any]) -> None:
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        who = "another process"
        if holder:
            who = f"pid {holder.get('pid')} on {holder.get('host')}, {KINDS.get(str(holder.get('kind')), 'a run')}"
            who += f", since {holder['since']}" if holder.get("since") else ""
        raise ConfigError(
            f"{self.key}: {self.folder} is in use by another run ({who}); one run writes to a folder at a "
            "time: wait for it to end, or choose another output"
        )

    def release(self) -> None:
        """Let go of the lock and remove its file (and the folder, when this run created it and
        wrote nothing)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
        if self in _HELD:
            _HELD.remove(self)
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty


def _flock(fd: int) -> bool | None:
    """An exclusive ``flock`` on ``fd``: True when taken, False when another process holds it, None
    where the platform or the file system takes no locks (then the holder's pid decides)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (not a POSIX system)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def held() -> list[Path]:
    """The folders this process holds locks on, oldest first (a run inside another sees the outer one)."""
    return [lock.folder for lock in _HELD]


def release_all(since: int = 0) -> None:
    """Release the locks taken after the first ``since``, newest first."""
    while len(_HELD) > since:
        _HELD[-1].release()


atexit.register(release_all)

F = TypeVar("F", bound=Callable[..., Any])


def releases_locks(fn: F) -> F:
    """A run's entry point: every folder lock taken during the call is released when it returns
    or raises (a run that fails before its loop leaves no lock, and no empty folder, behind)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        depth = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            release_all(depth)

    return call  # type: ignore[return-value]


@contextlib.contextmanager
def holding(folder: Path, kind: str, key: str) -> Iterator[FolderLock]:
    """``with holding(folder, kind, key):`` the lock, for a run that is one block of code."""
    lock = FolderLock(folder, kind, key).acquire()
    try:
        yield lock
    finally:
        lock.release()
