"""The tokenized store: ids read back from it equal a fresh scan's, for every kind of example; any
change to what decides the ids makes a new store; a killed or damaged one is never used; several
tokenizing processes give what one gives."""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import sentiment_records, unpaired_records

from preftune.cli import main
from preftune.config import DataConfig
from preftune.data import DataError, prepare_pairs, prepare_unpaired, scan, scan_unpaired
from preftune.data.sft import prepare_sft
from preftune.data.store import Examples
from preftune.experiments.synthetic import tiny_llama
from preftune.model.reference import Batching, ModelReference, precompute

SRC = Path(__file__).parent.parent / "src"
# The modules, not the functions ``preftune.data`` exports under the same names.
scan_module = importlib.import_module("preftune.data.scan")
unpaired_module = importlib.import_module("preftune.data.unpaired")


def messages(record: dict) -> dict:
    """A standard record as a conversation."""
    user = [{"role": "user", "content": record["prompt"]}]
    answer = [{"role": "assistant", "content": record[k].strip()} for k in ("chosen", "rejected")]
    return {"prompt": user, "chosen": answer[:1], "rejected": answer[1:]}


def implicit(record: dict) -> dict:
    return {"chosen": record["prompt"] + record["chosen"], "rejected": record["prompt"] + record["rejected"]}


def sft_records(n: int) -> list[dict]:
    out: list[dict] = []
    for i, r in enumerate(sentiment_records(n, seed=5)):
        shapes = (
            {"prompt": r["prompt"], "completion": r["chosen"]},
            {"messages": messages(r)["prompt"] + messages(r)["chosen"]},
            {"text": r["prompt"] + r["chosen"]},
        )
        out.append(shapes[i % 3])
    return out


PAIRS = sentiment_records(24, seed=1)
FORMATS = {
    "standard": (prepare_pairs, PAIRS),
    "conversational": (prepare_pairs, [messages(r) for r in PAIRS]),
    "implicit prompt": (prepare_pairs, [implicit(r) for r in PAIRS]),
    "sft": (prepare_sft, sft_records(24)),
    "unpaired": (prepare_unpaired, unpaired_records(12, seed=2) + sentiment_records(12, seed=3)),
}


def write(folder: Path, records: list[dict], name: str = "data.jsonl") -> str:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def settings(tmp_path: Path, **overrides) -> DataConfig:
    return DataConfig(**{"cache_dir": str(tmp_path / "cache"), "max_length": None, **overrides})


def rows(examples) -> list[tuple]:
    """Every field of every example (pairs, sequences or unpaired examples), as plain values."""
    return [tuple(vars(e).values()) for e in examples]


def stores(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def in_file(examples, path: str) -> list[tuple]:
    """Rows of examples read from a list of records, named as the same records in ``path`` would be."""
    return [
        tuple(f"{path}:{int(v[7:]) + 1}" if str(v).startswith("record ") else v for v in row)
        for row in rows(examples)
    ]


@pytest.mark.parametrize("name", FORMATS)
def test_ids_read_back_from_the_store_equal_a_scan_in_memory(name, tokenizer, tmp_path):
    prepare, records = FORMATS[name]
    path = write(tmp_path, records)
    in_memory, _ = prepare(records, tokenizer, settings(tmp_path), progress=False)
    prepare(path, tokenizer, settings(tmp_path), progress=False)
    reused, report = prepare(path, tokenizer, settings(tmp_path), progress=False)
    assert isinstance(in_memory, list) and isinstance(reused, Examples)
    assert report.cache.startswith("token ids reused from")
    assert rows(reused) == in_file(in_memory, path)


def test_a_reused_store_brings_back_the_data_report(tokenizer, tmp_path):
    records = [*PAIRS[:6], {**PAIRS[6], "chosen": ""}, {**PAIRS[7], "rejected": PAIRS[7]["chosen"]}]
    path = write(tmp_path, records)
    config = settings(tmp_path, max_length=24)
    _, fresh = prepare_pairs(path, tokenizer, settings(tmp_path, max_length=24, cache=False), progress=False)
    prepare_pairs(path, tokenizer, config, progress=False)
    _, reused = prepare_pairs(path, tokenizer, config, progress=False)
    assert reused.findings.by_rule.keys() == {"empty_completion", "identical"}
    assert reused.summary().splitlines()[:-1] == fresh.summary().splitlines()[:-1]
    assert reused.statistics() == fresh.statistics()


def test_stored_examples_are_read_from_memory_mapped_files_when_drawn(tokenizer, tmp_path):
    pairs, _ = prepare_pairs(write(tmp_path, PAIRS), tokenizer, settings(tmp_path), progress=False)
    assert isinstance(pairs, Examples) and isinstance(pairs.store.columns["tokens"], np.memmap)
    assert pairs[3] == pairs[3] and pairs[3] is not pairs[3]  # built on each access, never kept


def _new_token(tokenizer, _config, _path):
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["sky-blue"])
    return changed, _config


def _new_template(tokenizer, config, _path):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = changed.chat_template.replace("</s>\n", "</s>")
    return changed, config


def _new_record(tokenizer, config, path):
    Path(path).write_text(Path(path).read_text().replace("park", "parks", 1))
    return tokenizer, config


def _new_setting(tokenizer, config, _path):
    return tokenizer, DataConfig(**{**vars(config), "max_prompt_length": 8})


CHANGES = {
    "tokenizer": _new_token,
    "chat template": _new_template,
    "data file": _new_record,
    "data key": _new_setting,
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_to_what_decides_the_ids_makes_a_new_store(change, tokenizer, tmp_path):
    assert "</s>\n" in tokenizer.chat_template
    path = write(tmp_path, [messages(r) for r in PAIRS])
    config = settings(tmp_path)
    prepare_pairs(path, tokenizer, config, progress=False)
    changed_tokenizer, changed_config = CHANGES[change](tokenizer, config, path)
    _, report = prepare_pairs(path, changed_tokenizer, changed_config, progress=False)
    assert report.cache.startswith("tokenized") and len(stores(tmp_path)) == 2


def test_settings_that_do_not_decide_the_ids_share_the_store(tokenizer, tmp_path):
    path = write(tmp_path, PAIRS)
    prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    others = settings(tmp_path, layout="padded", num_proc=2, eval_path="other.jsonl")
    _, report = prepare_pairs(path, tokenizer, others, progress=False)
    assert report.cache.startswith("token ids reused from") and len(stores(tmp_path)) == 1


WRITER = """
import sys, time
import preftune.data.store as store
from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.experiments.synthetic import build_tokenizer

add = store.Writer.add
def add_then_hang(self, arrays, base=0):
    add(self, arrays, base)
    print("WROTE A CHUNK", flush=True)
    time.sleep(600)
store.Writer.add = add_then_hang
prepare_pairs(sys.argv[1], build_tokenizer(), DataConfig(cache_dir=sys.argv[2], max_length=None), progress=False)
"""


def test_a_writer_killed_mid_write_leaves_no_store_that_is_used(tokenizer, tmp_path):
    path = write(tmp_path, PAIRS)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-c", textwrap.dedent(WRITER), path, str(tmp_path / "cache")]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout is not None and writer.stdout.readline() == "WROTE A CHUNK\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert [name.startswith(".tmp-") for name in stores(tmp_path)] == [True]  # half a store, hidden
    pairs, report = prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    fresh, _ = prepare_pairs(path, tokenizer, settings(tmp_path, cache=False), progress=False)
    assert report.cache.startswith("tokenized") and rows(pairs) == rows(fresh)
    assert not [name for name in stores(tmp_path) if name.startswith(".tmp-")]  # the dead writer's, removed


def test_a_damaged_store_is_rebuilt_with_a_notice(tokenizer, tmp_path, capsys):
    path = write(tmp_path, PAIRS)
    first, _ = prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    expected = rows(first)
    tokens = tmp_path / "cache" / stores(tmp_path)[0] / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-8])
    pairs, report = prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    assert "is damaged" in capsys.readouterr().out and report.cache.startswith("tokenized")
    assert rows(pairs) == expected


def test_two_processes_give_the_same_pairs_report_and_errors_as_one(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(scan_module, "CHUNK", 4)  # many chunks from a small file
    records = [dict(r) for r in sentiment_records(40, seed=7)]
    for i in (5, 13, 14, 22, 31):
        records[i]["rejected"] = ""  # bad records, the third of them in the middle of a chunk
    records[9]["rejected"] = records[9]["chosen"]
    path = write(tmp_path, records)
    outcomes = []
    for processes in (1, 2):
        config = settings(tmp_path, num_proc=processes, empty_completions="error", max_length=40)
        pairs, report, errors = scan(path, tokenizer, config, progress=False, max_errors=3)
        outcomes.append((rows(pairs), report.summary(), report.records, [str(e) for e in errors]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][2] == 16 and len(outcomes[0][3]) == 3  # stopped at the record after the third error


@pytest.mark.parametrize("kind", ["pairs", "sft", "unpaired"])
def test_two_processes_store_the_same_examples_as_one(kind, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(scan_module, "CHUNK", 4)
    monkeypatch.setattr(unpaired_module, "UNPAIR_BLOCK", 3)  # blocks of pairs that span chunks
    prepare, records = {"pairs": FORMATS["standard"], "sft": FORMATS["sft"], "unpaired": FORMATS["unpaired"]}[
        kind
    ]
    path = write(tmp_path, records)
    stored = []
    for processes in (1, 2):
        examples, report = prepare(
            path, tokenizer, settings(tmp_path / str(processes), num_proc=processes), progress=False
        )
        stored.append((rows(examples), report.summary().splitlines()[:-1]))
    assert stored[0] == stored[1]


def test_unpaired_records_with_a_bad_record_report_record_errors_before_example_errors(
    tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setattr(scan_module, "CHUNK", 4)
    records = unpaired_records(12, seed=2)
    records[9] = {**records[9], "label": "maybe"}  # a bad record after examples that are fine
    path = write(tmp_path, records)
    config = settings(tmp_path, num_proc=2)
    examples, report, errors = scan_unpaired(path, tokenizer, config, progress=False)
    assert [str(e) for e in errors] == [
        f"{path}:10: field 'label' must be true (desirable) or false (undesirable), got 'maybe'"
    ]
    assert report.records == 12 and report.kept == len(examples) == 11


def test_cache_ls_lists_the_stores_and_clear_removes_them(tokenizer, tmp_path, capsys):
    prepare_pairs(write(tmp_path, PAIRS), tokenizer, settings(tmp_path), progress=False)
    assert main(["cache", "ls", "--dir", str(tmp_path / "cache")]) == 0
    listed = capsys.readouterr().out
    assert "1 tokenized store" in listed and f"24 pairs from {tmp_path / 'data.jsonl'}" in listed
    assert main(["cache", "clear", "--dir", str(tmp_path / "cache")]) == 0
    assert "removed 1 tokenized store" in capsys.readouterr().out and stores(tmp_path) == []


def test_reference_tables_of_stored_pairs_equal_those_of_pairs_in_memory(tokenizer, tmp_path):
    path = write(tmp_path, PAIRS)
    stored, _ = prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    in_memory, _ = prepare_pairs(path, tokenizer, settings(tmp_path, cache=False), progress=False)
    reference = ModelReference(tiny_llama(len(tokenizer), seed=4))
    batching = Batching(tokenizer.pad_token_id, 5)
    tables = [precompute(reference, pairs, batching, progress=False) for pairs in (stored, in_memory)]
    for name, table in tables[0].items():
        assert torch.equal(table, tables[1][name]), name


def test_reward_model_and_policy_training_share_one_store_each_with_its_margins(tokenizer, tmp_path):
    path = write(tmp_path, [{**r, "margin": i / 4} for i, r in enumerate(PAIRS)])
    policy, _ = prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    reward, report = prepare_pairs(path, tokenizer, settings(tmp_path), progress=False, margin_field="margin")
    expected, _ = prepare_pairs(
        path, tokenizer, settings(tmp_path, cache=False), progress=False, margin_field="margin"
    )
    assert report.cache.startswith("token ids reused from") and len(stores(tmp_path)) == 1
    assert rows(reward) == rows(expected) and {p.margin for p in policy} == {0.0}


def test_a_bad_margin_in_a_shared_store_stops_the_run_as_a_fresh_scan_does(tokenizer, tmp_path):
    path = write(tmp_path, [{**r, "margin": "wide" if i == 2 else 1} for i, r in enumerate(PAIRS)])
    prepare_pairs(path, tokenizer, settings(tmp_path), progress=False)
    with pytest.raises(DataError) as fresh:
        prepare_pairs(path, tokenizer, settings(tmp_path, cache=False), progress=False, margin_field="margin")
    with pytest.raises(DataError) as shared:
        prepare_pairs(path, tokenizer, settings(tmp_path), progress=False, margin_field="margin")
    assert str(shared.value) == str(fresh.value) == f"{path}:3: field 'margin' must be a number, got 'wide'"


def test_a_dataset_backed_by_arrow_files_is_stored_under_its_fingerprint(tokenizer, tmp_path):
    import datasets

    path = write(tmp_path, PAIRS)
    dataset = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    fresh, _ = prepare_pairs(path, tokenizer, settings(tmp_path, cache=False), progress=False)
    prepare_pairs(dataset, tokenizer, settings(tmp_path), progress=False)
    reused, report = prepare_pairs(dataset, tokenizer, settings(tmp_path), progress=False)
    assert report.cache.startswith("token ids reused from") and stores(tmp_path)[0].startswith("pairs-")
    assert [p.prompt_ids for p in reused] == [p.prompt_ids for p in fresh]


def test_without_the_cache_a_file_is_tokenized_into_a_store_that_leaves_nothing_on_disk(tokenizer, tmp_path):
    path = write(tmp_path, PAIRS)
    pairs, report = prepare_pairs(path, tokenizer, settings(tmp_path, cache=False), progress=False)
    in_memory, _ = prepare_pairs(PAIRS, tokenizer, settings(tmp_path), progress=False)
    assert isinstance(pairs, Examples) and isinstance(pairs.store.columns["tokens"], np.memmap)
    assert rows(pairs) == in_file(in_memory, path) and stores(tmp_path) == []
    assert report.cache.endswith("token ids kept until the run ends")
