"""``preftune check-data`` and ``preftune train`` on real templates and public formats: the data
rules' findings as a table, exit codes usable as a CI gate, the summary a run starts with."""

from __future__ import annotations

import json
import shutil

import pytest
from real_chat import DATASETS, real_tokenizer

from preftune.cli import main
from preftune.experiments.synthetic import tiny_llama

USER = {"role": "user", "content": "What is 2+2?"}


def chat_pair(prompt: list) -> dict:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "4."}],
        "rejected": [{"role": "assistant", "content": "5."}],
    }


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Tokenizer folders (what ``--model`` needs for check-data) of a few real templates."""
    root = tmp_path_factory.mktemp("tokenizers")
    for name in ("r1_distill_new", "gemma2", "llama3_1"):
        real_tokenizer(name).save_pretrained(root / name)
    return root


def fixture(tmp_path, name):
    return shutil.copy(DATASETS / f"{name}.jsonl", tmp_path / f"{name}.jsonl")


def test_check_data_prints_the_rules_findings_as_a_table(tokenizers, tmp_path, capsys):
    data = fixture(tmp_path, "trl_conversational")
    assert main(["check-data", str(data), "--model", str(tokenizers / "r1_distill_new")]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("rule "))
    assert out[header].split() == ["rule", "records", "setting", "first", "example"]
    assert out[header + 1].split("  ")[0] == "prompt alone renders differently"
    assert out[header + 1].endswith(
        "3  data.template_mismatch=warn  "
        f"{data}:1: '<think>\\n' ends the prompt rendered alone, not the conversation"
    )


def test_check_data_exits_2_when_a_rule_is_set_to_error(tokenizers, tmp_path, capsys):
    data = fixture(tmp_path, "trl_conversational")
    argv = ["check-data", str(data), "--model", str(tokenizers / "r1_distill_new")]
    assert main([*argv, "--set", "data.template_mismatch=error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preftune: error: 3 bad records:\n")
    assert f"{data}:1: the chat template ends the prompt rendered alone with '<think>\\n'" in err


def test_check_data_names_a_template_refusal_with_the_other_bad_records_and_no_traceback(
    tokenizers, tmp_path, capsys
):
    data = tmp_path / "chat.jsonl"
    system = {"role": "system", "content": "Be brief."}
    data.write_text(
        json.dumps(chat_pair([USER])) + "\n" + json.dumps(chat_pair([system, USER])) + "\nnot json\n"
    )
    assert main(["check-data", str(data), "--model", str(tokenizers / "gemma2")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "preftune: error: 2 bad records:",
        f"  {data}:2: the chat template refused the messages: System role not supported",
        f"  {data}:3: malformed JSON (Expecting value at column 1)",
    ]


def test_check_data_on_an_empty_file_is_an_error(tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert main(["check-data", str(data)]) == 2
    assert capsys.readouterr().err.strip() == f"preftune: error: {data}: no records"


def test_check_data_counts_the_pairs_the_policies_leave(tokenizers, tmp_path, capsys):
    data = fixture(tmp_path, "hh_rlhf")
    assert main(["check-data", str(data), "--model", str(tokenizers / "llama3_1")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{data}: 8 records, 8 valid, 0 bad; 6 pairs kept\n")
    assert f"empty completion        2  data.empty_completions=drop  {data}:4: field 'rejected'" in out


def test_train_says_what_the_template_changes_before_training(tmp_path, capsys):
    model = tmp_path / "model"
    tokenizer = real_tokenizer("glm4_5")
    tokenizer.save_pretrained(model)
    tiny_llama(len(tokenizer)).save_pretrained(model)
    data = fixture(tmp_path, "trl_conversational")
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out")]
    settings = ["train.max_steps=1", "train.batch_size=2", "train.report_to=none", "train.progress=false"]
    assert main([*argv, *(arg for s in settings for arg in ("--set", s))]) == 0
    out = capsys.readouterr().out
    start = out.index("data: 3/3 pairs kept")
    assert out.index("objective:") > out.index(
        f"template adds text to the answer: 3 records (trained as rendered) at {data}:1", start
    )
    assert f"no EOS or end-of-turn token: 3 records (data.missing_eos=warn) at {data}:1" in out
