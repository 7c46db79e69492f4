"""Hub names resolved offline, the way a machine that downloaded them once resolves them.

No hub is reachable here, yet TRL's and LLaMA-Factory's example configs name hub models and
datasets (``Qwen/Qwen2.5-0.5B``, ``anthropic/hh-rlhf``). With ``HF_HUB_OFFLINE=1`` the hub client
and ``datasets`` look only in their caches, so a tiny model saved into the model cache's layout
(``models--ORG--NAME/snapshots/<commit>/`` and ``refs/main``) and a small dataset prepared into
``datasets``' cache layout (``ORG___NAME/default/0.0.0/<hash>/``, what ``load_dataset`` leaves
after a download) are found under the same names by the unchanged loading code. Only the
contents are stand-ins: a random tiny Llama, a few synthetic records.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hub_cache: Path, repo_id: str, model: Any, tokenizer: Any) -> Path:
    """Save ``model`` and ``tokenizer`` as the cached snapshot of ``repo_id``; the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def cache_dataset(datasets_cache: Path, repo_id: str, splits: dict[str, list[dict[str, Any]]]) -> None:
    """Prepare ``splits`` as the cached download of the hub dataset ``repo_id`` (config ``default``)."""
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    work = datasets_cache / "_build"
    files = {}
    for split, records in splits.items():
        path = work / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files[split] = str(path)
    builder = Json(cache_dir=str(work / "cache"), dataset_name=name, data_files=files)
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    # A download is cached under ORG___NAME/<config>/<version>/<hash>/: move the prepared files there.
    target = datasets_cache / f"{namespace}___{name}" / "default" / "0.0.0" / COMMIT[:16]
    target.mkdir(parents=True)
    for item in prepared.iterdir():
        if item.suffix in (".arrow", ".json"):
            shutil.move(str(item), target / item.name)
    shutil.rmtree(work)


def offline_env(root: Path) -> dict[str, str]:
    """The environment of a subprocess that sees only the caches under ``root``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "HF_HUB_CACHE": str(root / "hf" / "hub"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
