"""Time to the first training step and peak memory, from a data file: preftune's ``train`` against
TRL's ``DPOTrainer`` on the same file, tokenizer and model, each in its own process, interleaved.

    .venv/bin/python bench/data_prep.py --pairs 100000          # make the data once, then measure
    .venv/bin/python bench/data_prep.py --pairs 1000000 --runs 1

The data: ``--pairs`` synthetic pairs, a prompt of about 128 words and two responses of about 64,
over a word-level tokenizer (one token per word) built locally, with a tiny Llama (the step itself
costs nothing: what is measured is everything before it). Each side runs ``max_steps=1`` at
``max_length=512`` twice: a first start with its cache emptied (preftune's tokenized store, TRL's
``datasets`` cache) and a second start on the same file. Figures are whole-process wall seconds and
the process's peak resident memory (``wait4``'s ``ru_maxrss``); the median of ``--runs`` is kept.
Results go to ``bench/results/data-prep-<pairs>.json`` with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from common import machine, median  # noqa: E402

WORDS = 4096
PROMPT_WORDS, RESPONSE_WORDS = 128, 64


def make_data(pairs: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """The JSONL file and the model folder (a tiny Llama and its word-level tokenizer), made once."""
    import numpy as np

    data, model_dir = folder / f"pairs-{pairs}.jsonl", folder / "model"
    if not model_dir.exists():
        _save_model(model_dir)
    if data.exists():
        return data, model_dir
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(WORDS)])
    tmp = data.with_name(f".tmp-{data.name}")
    with tmp.open("w", encoding="utf-8") as handle:
        for start in range(0, pairs, 10_000):
            count = min(10_000, pairs - start)
            lengths = rng.integers(-8, 9, size=(count, 3)) + np.array(
                [PROMPT_WORDS, RESPONSE_WORDS, RESPONSE_WORDS]
            )
            for p, c, r in lengths:
                texts = (" ".join(words[rng.integers(0, WORDS, size=n)]) for n in (p, c, r))
                handle.write(
                    json.dumps(dict(zip(("prompt", "chosen", "rejected"), texts, strict=True))) + "\n"
                )
    os.replace(tmp, data)
    return data, model_dir


def _save_model(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def preftune_command(data: Path, model: Path, out: Path, cache: Path) -> list[str]:
    settings = {
        "train.max_steps": 1, "train.batch_size": 8, "train.save_every": "null", "train.report_to": "none",
        "train.progress": "false", "data.max_length": 512,
    }  # fmt: skip
    from preftune.config import DataConfig

    if "cache_dir" in DataConfig.__dataclass_fields__:
        settings["data.cache_dir"] = str(cache)
    command = [str(HERE.parent / ".venv" / "bin" / "preftune"), "train", "--model", str(model)]
    command += ["--data", str(data), "--output", str(out), "--set", "train.overwrite=true"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return command


def trl_worker(data: str, model: str, out: str) -> None:
    """TRL's DPOTrainer, one step, its dataset built and tokenized by ``datasets`` (cached)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=data, split="train")
    config = DPOConfig(
        output_dir=out, max_steps=1, per_device_train_batch_size=8, max_length=512, report_to=[],
        save_strategy="no", logging_steps=1, bf16=False, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model)
    )
    trainer.train()


def measure(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and peak resident MiB of one process (and the children it waited for)."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the child
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if status != 0:
            log.seek(0)
            error = log.read().decode(errors="replace")
            raise RuntimeError(f"{command[:3]} failed ({status}):\n{error[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_mib": round(usage.ru_maxrss / 1024, 1)}


def run_side(side: str, data: Path, model: Path, work: Path) -> dict[str, dict[str, float]]:
    """A first start (caches emptied) and a second start on the same data."""
    cache, out = work / f"{side}-cache", work / f"{side}-out"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    if side == "trl":
        command = [sys.executable, __file__, "--trl-worker", str(data), str(model), str(out)]
    else:
        command = preftune_command(data, model, out, cache)
    return {"first": measure(command, env), "second": measure(command, env)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=2, help="interleaved runs of each side (median kept)")
    parser.add_argument("--sides", nargs="+", default=["preftune", "trl"])
    parser.add_argument("--data-dir", default=str(HERE.parent / "bench-data"))
    parser.add_argument("--trl-worker", nargs=3, metavar=("DATA", "MODEL", "OUT"))
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(*args.trl_worker)
    folder = Path(args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data, model = make_data(args.pairs, folder)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {side: [] for side in args.sides}
    for _ in range(args.runs):
        for side in args.sides:
            runs[side].append(run_side(side, data, model, folder / "work"))
            print(side, json.dumps(runs[side][-1]), flush=True)
    summary = {
        side: {start: {key: median([r[start][key] for r in rows]) for key in ("seconds", "peak_mib")}
               for start in ("first", "second")}
        for side, rows in runs.items()
    }  # fmt: skip
    print(f"\n{args.pairs} pairs; median of {args.runs} interleaved runs")
    print(
        f"{'side':10}{'first start s':>15}{'second start s':>16}{'peak MiB (1st)':>16}{'peak MiB (2nd)':>16}"
    )
    for side, figures in summary.items():
        first, second = figures["first"], figures["second"]
        print(
            f"{side:10}{first['seconds']:>15.1f}{second['seconds']:>16.1f}{first['peak_mib']:>16.0f}{second['peak_mib']:>16.0f}"
        )
    if {"preftune", "trl"} <= set(summary):
        ratio = summary["preftune"]["first"]["seconds"] / summary["trl"]["first"]["seconds"]
        print(f"first start, preftune / trl: {ratio:.2f}")
    result = {"pairs": args.pairs, "runs": runs, "summary": summary, "machine": machine()}
    path = HERE / "results" / f"data-prep-{args.pairs}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
