"""Real TRL and LLaMA-Factory example configs, unchanged, train for two steps under preftune.

Each runs as a user runs it, ``preftune <command> --config THEIR.yaml --max_steps 2``, in a fresh
process with ``HF_HUB_OFFLINE=1``. The hub names the files hold resolve from the caches
(:mod:`offline_hub`): a tiny Llama under ``Qwen/Qwen2.5-0.5B`` and
``meta-llama/Meta-Llama-3-8B-Instruct``, a few synthetic records under ``anthropic/hh-rlhf`` and
``stanfordnlp/imdb``, and LLaMA-Factory's ``dpo_en_demo`` in its ``data/dataset_info.json`` beside
the working folder, in its ShareGPT shape. Only the contents are stand-ins; the files, the names
and the loading code are the real ones. ``--max_steps 2`` (TRL's spelling) keeps the runs short.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import offline_hub
import pytest

from preftune.experiments.synthetic import NEGATIVE, POSITIVE, TOPICS, tiny_llama

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def hh_pair(rng: random.Random, i: int) -> dict[str, str]:
    """Anthropic HH's shape: the whole dialogue in chosen and rejected, the prompt implicit."""
    prompt = f"\n\nHuman: review of the {TOPICS[i % len(TOPICS)]}\n\nAssistant:"
    return {
        "chosen": prompt + " " + " ".join(rng.choice(POSITIVE) for _ in range(3)),
        "rejected": prompt + " " + " ".join(rng.choice(NEGATIVE) for _ in range(2)),
    }


def sharegpt_pair(rng: random.Random, i: int) -> dict[str, object]:
    """LLaMA-Factory's dpo_en_demo shape."""
    return {
        "conversations": [{"from": "human", "value": f"review of the {TOPICS[i % len(TOPICS)]}"}],
        "chosen": {"from": "gpt", "value": " ".join(rng.choice(POSITIVE) for _ in range(3))},
        "rejected": {"from": "gpt", "value": " ".join(rng.choice(NEGATIVE) for _ in range(2))},
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("offline")
    model = tiny_llama(len(tokenizer))
    for repo in ("Qwen/Qwen2.5-0.5B", "meta-llama/Meta-Llama-3-8B-Instruct"):
        offline_hub.cache_model(root / "hf" / "hub", repo, model, tokenizer)
    rng = random.Random(0)
    datasets_cache = root / "hf" / "datasets"
    hh = [hh_pair(rng, i) for i in range(24)]
    offline_hub.cache_dataset(datasets_cache, "anthropic/hh-rlhf", {"train": hh[:16], "test": hh[16:]})
    reviews = [
        {"text": f"the {TOPICS[i % len(TOPICS)]} was {rng.choice(POSITIVE)}", "label": 1} for i in range(16)
    ]
    offline_hub.cache_dataset(datasets_cache, "stanfordnlp/imdb", {"train": reviews})
    (root / "data").mkdir()
    info = {"dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}  # fmt: skip
    (root / "data" / "dataset_info.json").write_text(json.dumps(info))
    (root / "data" / "dpo_en_demo.json").write_text(json.dumps([sharegpt_pair(rng, i) for i in range(20)]))
    return root


def run(workdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "preftune.cli",
        *argv,
        "--max_steps",
        "2",
        "--set",
        "train.progress=false",
    ]
    return subprocess.run(
        command, cwd=workdir, env=offline_hub.offline_env(workdir), capture_output=True, text=True
    )


def last_step(output: Path) -> int:
    return json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])["step"]


@pytest.mark.slow  # a fresh process each (imports, then two steps): half a minute
def test_trls_dpo_config_trains_unchanged(workdir):
    done = run(workdir, "train", "--config", str(CONFIGS / "trl" / "docs" / "dpo_config.yaml"))
    assert done.returncode == 0, done.stderr
    output = workdir / "runs" / "preftune"
    assert last_step(output) == 2
    assert "preftune: trl: dataset_name=anthropic/hh-rlhf -> data.path=anthropic/hh-rlhf" in done.stderr
    config = json.loads((output / "config.json").read_text())
    assert (config["model"]["name_or_path"], config["train"]["epochs"]) == ("Qwen/Qwen2.5-0.5B", 3.0)


@pytest.mark.slow  # a fresh process each (imports, then two steps): half a minute
def test_trls_example_cli_config_trains_sft_unchanged(workdir):
    done = run(
        workdir, "sft", "--config", str(CONFIGS / "trl" / "example_config.yaml"), "--output_dir", "sft-out"
    )
    assert done.returncode == 0, done.stderr
    assert last_step(workdir / "sft-out") == 2
    config = json.loads((workdir / "sft-out" / "config.json").read_text())
    assert (config["train"]["learning_rate"], config["train"]["scheduler"]) == (1e-4, "cosine")


@pytest.mark.slow  # a fresh process each (imports, then two steps): half a minute
def test_llamafactorys_dpo_config_trains_unchanged(workdir):
    done = run(workdir, "train", "--config", str(CONFIGS / "llamafactory" / "llama3_lora_dpo.yaml"))
    assert done.returncode == 0, done.stderr
    output = workdir / "saves" / "llama3-8b" / "lora" / "dpo"
    assert last_step(output) == 2
    assert "data: 20/20 pairs kept" in done.stdout
    config = json.loads((output / "config.json").read_text())
    assert (config["model"]["lora"], config["model"]["lora_alpha"], config["data"]["max_length"]) == (
        True,
        16,
        2048,
    )
