"""Hub datasets read as TRL's scripts read them: a configuration after a colon (``name:config``), a
sliced split (``train[:50%]``), another split of the same dataset for evaluation, and streaming
(``stream:train``), which iterates without preparing the dataset. Exercised on local dataset folders
through the same ``datasets`` calls a hub name takes (no hub is reachable here)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from preftune.cli import main
from preftune.config import ConfigError, DataConfig, RunConfig, load_config, validate
from preftune.data import read_records
from preftune.errors import DataError
from preftune.experiments.synthetic import NEGATIVE, POSITIVE, tiny_llama


def pairs(n: int, tag: str) -> list[dict[str, str]]:
    return [
        {"prompt": f"{tag} review {i}:", "chosen": f" {POSITIVE[i % len(POSITIVE)]}", "rejected": f" {NEGATIVE[i % len(NEGATIVE)]}"}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """``datasets`` prepares (and reads back) its Arrow files here, not in the user's cache."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture
def folder(tmp_path) -> Path:
    """A script-free dataset folder with two configurations, as a hub repository holds them."""
    root = tmp_path / "prefs"
    for config, n in (("short", 4), ("long", 6)):
        for split in ("train", "test"):
            path = root / config / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in pairs(n, f"{config}-{split}")))
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n"
        for c in ("short", "long")
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return root


def prompts(source: str, split: str = "train") -> list[str]:
    return [record["prompt"] for _, record in read_records(source, split)]


def test_a_configuration_is_named_after_a_colon(folder):
    assert prompts(f"{folder}:long") == [f"long-train review {i}:" for i in range(6)]


def test_a_split_is_sliced_as_datasets_slices_it(folder):
    assert prompts(f"{folder}:long", "train[2:4]") == ["long-train review 2:", "long-train review 3:"]
    assert prompts(f"{folder}:long", "test[:50%]") == [f"long-test review {i}:" for i in range(3)]


def test_a_saved_dataset_is_read_with_its_split_sliced(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs(4, "s"))}).save_to_disk(saved)
    assert prompts(str(saved), "train[-2:]") == ["s review 2:", "s review 3:"]
    assert prompts(str(saved), "train[:25%]") == ["s review 0:"]


def test_a_streamed_split_gives_the_records_in_the_same_order(folder):
    assert prompts(f"{folder}:short", "stream:test") == prompts(f"{folder}:short", "test")


def test_a_stream_prepares_nothing_on_disk(folder, datasets_cache):
    list(read_records(f"{folder}:long", "stream:train"))
    assert not list(datasets_cache.rglob("*.arrow"))
    list(read_records(f"{folder}:long", "train"))  # the prepared read, for contrast, writes its Arrow files
    assert list(datasets_cache.rglob("*.arrow"))


def test_a_stream_is_sliced_by_record_counts(folder):
    assert prompts(f"{folder}:long", "stream:train[1:3]") == ["long-train review 1:", "long-train review 2:"]


def test_a_stream_takes_no_percent_slice_and_says_why_in_one_line(folder):
    with pytest.raises(DataError) as refused:
        prompts(f"{folder}:long", "stream:train[:10%]")
    assert str(refused.value) == (
        f"{folder}:long: could not load dataset (split 'stream:train[:10%]'): expected SPLIT or "
        "SPLIT[START:STOP] counted in records from the start (a stream has no length)"
    )


def test_an_eval_split_alone_evaluates_that_split_of_the_same_dataset(folder):
    config = load_config(overrides=[f"data.path={folder}:short", "data.eval_split=test"])
    assert (config.data.eval_path, config.data.eval_split) == (f"{folder}:short", "test")


def test_an_eval_split_alone_on_a_file_is_refused(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^data.eval_split: .*pairs.jsonl is a file, which has no splits"):
        load_config(overrides=[f"data.path={tmp_path / 'pairs.jsonl'}", "data.eval_split=validation"])


def test_a_config_built_in_python_with_an_eval_split_and_no_eval_path_is_refused():
    with pytest.raises(
        ConfigError, match=r"^data.eval_split: names a split of data.eval_path, which is not set"
    ):
        validate(RunConfig(data=DataConfig(path="org/prefs", eval_split="validation")))


def test_train_streams_a_split_through_tokenization_and_evaluates_another(folder, tmp_path, tokenizer):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    tiny_llama(len(tokenizer)).save_pretrained(model)
    output = tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", f"{folder}:long", "--data.split", "stream:train",
            "--data.eval_split", "stream:test[:2]", "--output", str(output), "--max_steps", "2",
            "--train.batch_size", "2", "--train.progress", "false", "--train.report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((output / "config.json").read_text())["data"]
    assert (saved["path"], saved["eval_path"], saved["split"]) == (
        f"{folder}:long",
        f"{folder}:long",
        "stream:train",
    )
    assert "eval_loss" in (output / "metrics.jsonl").read_text()
