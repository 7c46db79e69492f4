"""Files written whole or not at all, JSONL, and JSON that stays strict.

Every file preftune writes beside a run (scores, reports, summaries, samples, caches) goes to a
hidden temporary name in the same folder and is renamed into place, so a crash or a full disk
never leaves half a file under the final name. Checkpoints, which are folders, have their own
atomic publish (:mod:`preftune.engine.checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> Path:
    """``text`` at ``path``, atomically (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, value: Any, indent: int | None = 2) -> Path:
    """``value`` as strict JSON (non-finite numbers become null), atomically."""
    return write_text(path, json.dumps(json_safe(value), indent=indent) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One strict-JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(json_safe(row)) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file preftune wrote (blank lines skipped); [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def json_safe(tree: Any, digits: int | None = None) -> Any:
    """``tree`` with every non-finite float replaced by None (JSON has no NaN or infinity), and with
    ``digits``, every float rounded to that many significant digits (a JSON a person can read)."""
    if isinstance(tree, dict):
        return {key: json_safe(value, digits) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [json_safe(value, digits) for value in tree]
    if isinstance(tree, float):
        if not math.isfinite(tree):
            return None
        return float(f"{tree:.{digits}g}") if digits else tree
    return tree
