"""Specification of preftune.data: records -> validated examples -> token ids.

Expected ids are computed here from plain ``tokenizer(...)`` / ``apply_chat_template`` calls,
never from preftune's own tokenization.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.config import DataConfig
from preftune.data import DataError, prepare_pairs, split_implicit_prompt
from preftune.experiments.synthetic import build_tokenizer

PROMPT = "Question: what colour is the sky? Answer:"
CHOSEN = " it is blue."
REJECTED = " it is green."

USER = {"role": "user", "content": "What colour is the sky?"}
ANSWER_BLUE = {"role": "assistant", "content": "It is blue."}
ANSWER_GREEN = {"role": "assistant", "content": "It is green."}

RECORDS = [
    {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    {
        "prompt": "Hello there, how are you today?",
        "chosen": " I am fine, thank you.",
        "rejected": " Go away.",
    },
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
]


def cfg(**overrides) -> DataConfig:
    return DataConfig(**{"max_length": None, **overrides})


def prepare(source, tokenizer, **overrides):
    return prepare_pairs(source, tokenizer, cfg(**overrides), progress=False)


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def expected_standard(tokenizer, prompt: str, chosen: str, rejected: str) -> tuple[list, list, list]:
    """Ids for a record whose prompt ends on a pre-token boundary (no merge across it)."""
    eos = [tokenizer.eos_token_id]
    return (
        ids(tokenizer, prompt),
        ids(tokenizer, chosen, special=False) + eos,
        ids(tokenizer, rejected, special=False) + eos,
    )


def as_tuples(pairs) -> list[tuple]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index) for p in pairs]


def write_jsonl(path: Path, lines: list) -> Path:
    """Write one line per item: dicts are JSON-encoded, strings are written verbatim."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def loc(path: Path, line: int | str) -> str:
    return re.escape(f"{path}:{line}:")


GOOD = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}


# --------------------------------------------------------------------------- token ids per format


def test_standard_prompt_ids_are_the_tokenized_prompt_starting_with_bos(tokenizer):
    (pair,), _ = prepare([GOOD], tokenizer)
    assert pair.prompt_ids == ids(tokenizer, PROMPT)
    assert pair.prompt_ids[0] == tokenizer.bos_token_id


def test_standard_completion_ids_are_the_completion_tokens_plus_one_eos_and_no_bos(tokenizer):
    (pair,), _ = prepare([GOOD], tokenizer)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert pair.chosen_ids == [*ids(tokenizer, CHOSEN, special=False), eos]
    assert pair.rejected_ids == [*ids(tokenizer, REJECTED, special=False), eos]
    for completion in (pair.chosen_ids, pair.rejected_ids):
        assert completion[-1] == eos
        assert completion.count(eos) == 1
        assert bos not in completion
    assert tokenizer.decode(pair.chosen_ids) == CHOSEN + tokenizer.eos_token


def test_standard_prompt_plus_completion_is_the_tokenized_full_text(tokenizer):
    (pair,), _ = prepare([GOOD], tokenizer)
    assert pair.prompt_ids + pair.chosen_ids == ids(tokenizer, PROMPT + CHOSEN + tokenizer.eos_token)
    assert pair.prompt_ids + pair.rejected_ids == ids(tokenizer, PROMPT + REJECTED + tokenizer.eos_token)


def test_tokens_merging_across_the_boundary_go_to_the_completion(tokenizer):
    # "pa" + "rk" tokenizes as "p" "ar" "k": the prompt's last token "a" is not in the full text.
    prompt, chosen, rejected = "review of the pa", "rk: great", "rk: awful"
    prompt_alone = ids(tokenizer, prompt)
    full_chosen = ids(tokenizer, prompt + chosen + tokenizer.eos_token)
    full_rejected = ids(tokenizer, prompt + rejected + tokenizer.eos_token)
    assert full_chosen[: len(prompt_alone)] != prompt_alone  # the example really merges
    (pair,), _ = prepare([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer)
    assert pair.prompt_ids == prompt_alone[:-1]
    assert pair.prompt_ids + pair.chosen_ids == full_chosen
    assert pair.prompt_ids + pair.rejected_ids == full_rejected


def test_a_trailing_space_in_the_prompt_merges_into_the_completion(tokenizer):
    prompt, chosen, rejected = "review of the park: ", "great", "awful"
    prompt_alone = ids(tokenizer, prompt)
    full_chosen = ids(tokenizer, prompt + chosen + tokenizer.eos_token)
    assert full_chosen[: len(prompt_alone)] != prompt_alone
    (pair,), _ = prepare([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer)
    assert pair.prompt_ids == ids(tokenizer, prompt.rstrip())
    assert pair.chosen_ids == [*ids(tokenizer, " " + chosen, special=False), tokenizer.eos_token_id]
    assert pair.rejected_ids == [*ids(tokenizer, " " + rejected, special=False), tokenizer.eos_token_id]


def test_eos_already_ending_a_standard_completion_is_not_doubled(tokenizer):
    eos = tokenizer.eos_token
    with_eos = {"prompt": PROMPT, "chosen": CHOSEN + eos, "rejected": REJECTED + eos}
    (pair,), _ = prepare([with_eos], tokenizer)
    (plain,), _ = prepare([GOOD], tokenizer)
    assert pair.chosen_ids == plain.chosen_ids
    assert pair.rejected_ids == plain.rejected_ids
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1


def test_conversational_prompt_is_the_chat_template_with_generation_prompt(tokenizer):
    record = {"prompt": [USER], "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]}
    (pair,), _ = prepare([record], tokenizer)
    assert pair.prompt_ids == chat_ids(tokenizer, [USER], add_generation_prompt=True)
    assert tokenizer.decode(pair.prompt_ids) == "<|user|>\nWhat colour is the sky?</s>\n<|assistant|>\n"


def test_conversational_completion_is_the_rest_of_the_templated_conversation(tokenizer):
    record = {"prompt": [USER], "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]}
    (pair,), _ = prepare([record], tokenizer)
    prompt = chat_ids(tokenizer, [USER], add_generation_prompt=True)
    full_chosen = chat_ids(tokenizer, [USER, ANSWER_BLUE])
    full_rejected = chat_ids(tokenizer, [USER, ANSWER_GREEN])
    assert full_chosen[: len(prompt)] == prompt
    assert pair.chosen_ids == full_chosen[len(prompt) :]
    assert pair.rejected_ids == full_rejected[len(prompt) :]
    assert tokenizer.decode(pair.chosen_ids) == "It is blue.</s>\n"
    assert tokenizer.decode(pair.rejected_ids) == "It is green.</s>\n"


def test_conversational_completion_gets_no_extra_eos(tokenizer):
    record = {"prompt": [USER], "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]}
    (pair,), _ = prepare([record], tokenizer)
    # The template closes every message with </s>; nothing is appended after its trailing newline.
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert pair.chosen_ids[-1] != tokenizer.eos_token_id


def test_implicit_prompt_string_shared_prefix_is_the_prompt_and_the_space_stays_with_completions():
    assert split_implicit_prompt("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")


def test_implicit_prompt_string_split_mid_word_keeps_the_whole_shared_prefix():
    assert split_implicit_prompt("It is blue.", "It is blunt.") == ("It is blu", "e.", "nt.")


def test_implicit_prompt_strings_tokenize_like_the_explicit_record(tokenizer):
    record = {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + " no idea."}
    (pair,), _ = prepare([record], tokenizer)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == expected_standard(
        tokenizer, PROMPT, CHOSEN, " no idea."
    )


def test_implicit_prompt_conversations_shared_leading_messages_are_the_prompt(tokenizer):
    system = {"role": "system", "content": "Be brief."}
    first = {"role": "assistant", "content": "Hello there."}
    user2 = {"role": "user", "content": "And the sun?"}
    shared = [system, USER, first, user2]
    chosen_turn = {"role": "assistant", "content": "It is bright."}
    rejected_turn = {"role": "assistant", "content": "It is cold."}
    assert split_implicit_prompt([*shared, chosen_turn], [*shared, rejected_turn]) == (
        shared,
        [chosen_turn],
        [rejected_turn],
    )
    (pair,), _ = prepare(
        [{"chosen": [*shared, chosen_turn], "rejected": [*shared, rejected_turn]}], tokenizer
    )
    prompt = chat_ids(tokenizer, shared, add_generation_prompt=True)
    assert pair.prompt_ids == prompt
    assert pair.chosen_ids == chat_ids(tokenizer, [*shared, chosen_turn])[len(prompt) :]
    assert pair.rejected_ids == chat_ids(tokenizer, [*shared, rejected_turn])[len(prompt) :]


def test_configurable_field_names_read_question_and_response_j_k(tokenizer):
    record = {"question": PROMPT, "response_j": CHOSEN, "response_k": REJECTED}
    config = {"prompt_field": "question", "chosen_field": "response_j", "rejected_field": "response_k"}
    (pair,), _ = prepare([record], tokenizer, **config)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == expected_standard(
        tokenizer, PROMPT, CHOSEN, REJECTED
    )


def test_configurable_field_names_appear_in_error_messages(tokenizer):
    record = {"question": PROMPT, "response_j": CHOSEN}
    config = {"prompt_field": "question", "chosen_field": "response_j", "rejected_field": "response_k"}
    with pytest.raises(DataError, match=r"record 0: missing field 'response_k'"):
        prepare([record], tokenizer, **config)


def test_null_prompt_field_means_the_prompt_is_implicit(tokenizer):
    (pair,), _ = prepare(
        [{"prompt": None, "chosen": PROMPT + CHOSEN, "rejected": PROMPT + " no."}], tokenizer
    )
    assert pair.prompt_ids == ids(tokenizer, PROMPT)


def test_pair_index_is_the_record_position_and_survives_drops(tokenizer):
    records = [RECORDS[0], {"prompt": "x", "chosen": " same", "rejected": " same"}, RECORDS[2]]
    pairs, _ = prepare(records, tokenizer, identical_pairs="drop")
    assert [p.index for p in pairs] == [0, 2]


# --------------------------------------------------------------------------- sources


def _jsonl(tmp_path, monkeypatch, records=RECORDS):
    return write_jsonl(tmp_path / "data.jsonl", records)


def _json_list(tmp_path, monkeypatch, records=RECORDS):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def _json_data_key(tmp_path, monkeypatch, records=RECORDS):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": records}))
    return path


def _csv(tmp_path, monkeypatch, records=RECORDS):
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(records)
    return path


def _parquet(tmp_path, monkeypatch, records=RECORDS):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def _path_as_str(tmp_path, monkeypatch, records=RECORDS):
    return str(_jsonl(tmp_path, monkeypatch, records))


def _dataset(tmp_path, monkeypatch, records=RECORDS):
    return datasets.Dataset.from_list(records)


def _list(tmp_path, monkeypatch, records=RECORDS):
    return [dict(r) for r in records]


def _hub(tmp_path, monkeypatch, records=RECORDS):
    def fake_load_dataset(name, split=None, **kwargs):
        assert (name, split) == ("org/prefs", "train")
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return "org/prefs"


SOURCES = {
    "jsonl": _jsonl,
    "json-list": _json_list,
    "json-data-key": _json_data_key,
    "csv": _csv,
    "parquet": _parquet,
    "path-as-str": _path_as_str,
    "datasets.Dataset": _dataset,
    "list-of-dicts": _list,
    "hub-name": _hub,
}


@pytest.mark.parametrize("make_source", SOURCES.values(), ids=SOURCES.keys())
def test_every_source_kind_gives_the_same_pairs(make_source, tokenizer, tmp_path, monkeypatch):
    pairs, report = prepare(make_source(tmp_path, monkeypatch), tokenizer)
    expected = [
        (*expected_standard(tokenizer, r["prompt"], r["chosen"], r["rejected"]), i)
        for i, r in enumerate(RECORDS)
    ]
    assert as_tuples(pairs) == expected
    assert (report.records, report.kept) == (3, 3)


LOCATIONS = {
    "jsonl": (_jsonl, lambda p: loc(p, 2)),
    "json-list": (_json_list, lambda p: re.escape(f"{p}: item 1:")),
    "csv": (_csv, lambda p: loc(p, 3)),  # line 1 is the header
    "parquet": (_parquet, lambda p: re.escape(f"{p}: row 1:")),
    "datasets.Dataset": (_dataset, lambda p: r"^dataset row 1:"),
    "list-of-dicts": (_list, lambda p: r"^record 1:"),
    "hub-name": (_hub, lambda p: r"^org/prefs\[train\] row 1:"),
}


@pytest.mark.parametrize(("make_source", "where"), LOCATIONS.values(), ids=LOCATIONS.keys())
def test_errors_name_the_source_and_line_or_row(make_source, where, tokenizer, tmp_path, monkeypatch):
    records = [RECORDS[0], {**RECORDS[1], "chosen": ""}, RECORDS[2]]
    source = make_source(tmp_path, monkeypatch, records)
    with pytest.raises(DataError, match=where(source) + r" field 'chosen' is an empty completion"):
        prepare(source, tokenizer, empty_completions="error")


def test_hub_dataset_name_is_loaded_with_the_requested_split(tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, _ = prepare_pairs("org/prefs", tokenizer, cfg(), split="test", progress=False)
    assert calls == [("org/prefs", "test")]
    assert len(pairs) == 1


def test_hub_dataset_that_fails_to_load_raises_data_error_naming_it(tokenizer, monkeypatch):
    def failing_load_dataset(name, split=None, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(
        DataError, match=r"^org/missing: could not load dataset \(split 'train'\): no network"
    ):
        prepare("org/missing", tokenizer)


def test_csv_reads_every_value_as_text_so_an_empty_cell_is_an_empty_completion(tokenizer, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,chosen,rejected\nQ:," yes"," no"\nQ:," yes",\n')
    with pytest.raises(DataError, match=loc(path, 3) + r" field 'rejected' is an empty completion"):
        prepare(path, tokenizer, empty_completions="error")


# --------------------------------------------------------------------------- truncation

LONG = {"prompt": PROMPT, "chosen": " it is blue, bright and clear.", "rejected": " no."}


def test_max_prompt_length_keeps_the_prompt_end(tokenizer):
    (pair,), report = prepare([LONG], tokenizer, max_prompt_length=5)
    prompt, chosen, rejected = expected_standard(tokenizer, LONG["prompt"], LONG["chosen"], LONG["rejected"])
    assert pair.prompt_ids == prompt[-5:]
    assert (pair.chosen_ids, pair.rejected_ids) == (chosen, rejected)
    assert report.prompt_truncated == 1


def test_prompts_within_max_prompt_length_are_untouched_and_not_counted(tokenizer):
    (pair,), report = prepare([LONG], tokenizer, max_prompt_length=len(ids(tokenizer, PROMPT)))
    assert pair.prompt_ids == ids(tokenizer, PROMPT)
    assert report.prompt_truncated == 0


def test_max_length_truncates_completions_keeping_their_start(tokenizer):
    prompt, chosen, rejected = expected_standard(tokenizer, LONG["prompt"], LONG["chosen"], LONG["rejected"])
    room = len(rejected) + 1
    assert len(chosen) > room
    (pair,), report = prepare([LONG], tokenizer, max_length=len(prompt) + room)
    assert pair.prompt_ids == prompt
    assert pair.chosen_ids == chosen[:room]
    assert pair.rejected_ids == rejected  # already fits
    assert report.completion_truncated == 1


def test_pairs_within_max_length_are_untouched_and_not_counted(tokenizer):
    prompt, chosen, rejected = expected_standard(tokenizer, LONG["prompt"], LONG["chosen"], LONG["rejected"])
    (pair,), report = prepare([LONG], tokenizer, max_length=len(prompt) + len(chosen))
    assert (pair.chosen_ids, pair.rejected_ids) == (chosen, rejected)
    assert report.completion_truncated == 0


def test_prompt_one_token_short_of_max_length_keeps_one_completion_token(tokenizer):
    prompt, chosen, rejected = expected_standard(tokenizer, LONG["prompt"], LONG["chosen"], LONG["rejected"])
    (pair,), report = prepare([LONG], tokenizer, max_length=len(prompt) + 1)
    assert (pair.chosen_ids, pair.rejected_ids) == (chosen[:1], rejected[:1])
    assert report.dropped_overlong_prompt == 0


def test_prompt_that_fills_max_length_is_dropped_counted_and_warned(tokenizer):
    short = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    with pytest.warns(UserWarning, match=r"record 0: field 'prompt' is \d+ tokens.*pair dropped"):
        pairs, report = prepare([LONG, short], tokenizer, max_length=len(ids(tokenizer, PROMPT)))
    assert [p.index for p in pairs] == [1]
    assert report.dropped_overlong_prompt == 1
    assert (report.records, report.kept) == (2, 1)


def test_prompt_that_fills_max_length_raises_with_overlong_prompt_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [RECORDS[1], LONG])
    with pytest.raises(
        DataError, match=loc(path, 2) + r" field 'prompt' is \d+ tokens, which fills data.max_length"
    ):
        prepare(path, tokenizer, max_length=len(ids(tokenizer, PROMPT)), overlong_prompt="error")


def test_max_prompt_length_applies_before_the_overlong_prompt_check(tokenizer):
    prompt, chosen, _ = expected_standard(tokenizer, LONG["prompt"], LONG["chosen"], LONG["rejected"])
    (pair,), report = prepare([LONG], tokenizer, max_prompt_length=4, max_length=6)
    assert pair.prompt_ids == prompt[-4:]
    assert pair.chosen_ids == chosen[:2]
    assert (report.prompt_truncated, report.completion_truncated, report.dropped_overlong_prompt) == (1, 1, 0)


def test_every_pair_dropped_raises_data_error_with_the_summary(tokenizer):
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"every pair was dropped\n0/1 pairs kept"):
        prepare([LONG], tokenizer, max_length=3)


def test_report_summary_mentions_the_counts(tokenizer):
    records = [
        LONG,  # completion truncated
        {
            "prompt": PROMPT + " " + PROMPT,
            "chosen": " yes",
            "rejected": " no",
        },  # prompt truncated, then dropped
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},  # identical, kept
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
    ]
    max_length = len(ids(tokenizer, PROMPT)) + 2
    with pytest.warns(UserWarning):
        _, report = prepare(records, tokenizer, max_length=max_length, max_prompt_length=max_length)
    summary = report.summary()
    assert "3/4 pairs kept" in summary
    assert "truncated: 1 prompts (kept their end), 1 pairs' completions (kept their start)" in summary
    assert "dropped: 1 pairs whose prompt fills max_length" in summary
    assert "1 pairs have chosen identical to rejected (0 dropped)" in summary


def test_report_records_prompt_and_longest_completion_lengths(tokenizer):
    pairs, report = prepare(RECORDS, tokenizer)
    assert report.prompt_lengths == [len(p.prompt_ids) for p in pairs]
    assert report.completion_lengths == [max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


# --------------------------------------------------------------------------- identical pairs


def test_identical_pair_raises_with_identical_pairs_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, {"prompt": "Q:", "chosen": " a", "rejected": " a"}])
    with pytest.raises(DataError, match=loc(path, 2) + r" field 'chosen' is identical to field 'rejected'"):
        prepare(path, tokenizer, identical_pairs="error")


def test_identical_pair_is_kept_counted_and_warned_with_identical_pairs_warn(tokenizer):
    records = [GOOD, {"prompt": "Q:", "chosen": " a", "rejected": " a"}]
    with pytest.warns(UserWarning, match=r"1 pairs have chosen identical to rejected"):
        pairs, report = prepare(records, tokenizer, identical_pairs="warn")
    assert [p.index for p in pairs] == [0, 1]
    assert (report.identical, report.dropped_identical) == (1, 0)


def test_identical_pair_is_dropped_and_counted_with_identical_pairs_drop(tokenizer):
    records = [GOOD, {"prompt": "Q:", "chosen": " a", "rejected": " a"}]
    pairs, report = prepare(records, tokenizer, identical_pairs="drop")
    assert [p.index for p in pairs] == [0]
    assert (report.identical, report.dropped_identical, report.kept) == (1, 1, 1)


def test_identical_implicit_prompt_pair_is_dropped_with_identical_pairs_drop(tokenizer):
    records = [GOOD, {"chosen": PROMPT + CHOSEN, "rejected": PROMPT + CHOSEN}]
    pairs, report = prepare(records, tokenizer, identical_pairs="drop")
    assert [p.index for p in pairs] == [0]
    assert report.dropped_identical == 1


# --------------------------------------------------------------------------- bad input

MSG_NO_ROLE = [{"content": "hi"}]
MSG_NO_CONTENT = [{"role": "assistant"}]
MSG_INT_CONTENT = [{"role": "assistant", "content": 3}]

BAD_RECORDS = {
    "missing-rejected": (
        {"prompt": "Q:", "chosen": " a"},
        r"missing field 'rejected' \(fields present: chosen, prompt\)",
    ),
    "missing-chosen": ({"prompt": "Q:", "rejected": " a"}, r"missing field 'chosen'"),
    "chosen-int": (
        {"prompt": "Q:", "chosen": 5, "rejected": " a"},
        r"field 'chosen' must be a string .*got int",
    ),
    "chosen-null": (
        {"prompt": "Q:", "chosen": None, "rejected": " a"},
        r"field 'chosen' must be a string .*got null",
    ),
    "rejected-dict": ({"prompt": "Q:", "chosen": " a", "rejected": {"x": 1}}, r"field 'rejected' .*got dict"),
    "prompt-int": (
        {"prompt": 7, "chosen": " a", "rejected": " b"},
        r"field 'prompt' must be a string .*got int",
    ),
    "chosen-empty": (
        {"prompt": "Q:", "chosen": "", "rejected": " a"},
        r"field 'chosen' is an empty completion",
    ),
    "rejected-whitespace": (
        {"prompt": "Q:", "chosen": " a", "rejected": " \n\t "},
        r"field 'rejected' is an empty completion",
    ),
    "chosen-no-messages": (
        {"prompt": [USER], "chosen": [], "rejected": [ANSWER_GREEN]},
        r"field 'chosen' is an empty completion",
    ),
    "chosen-text-rejected-messages": (
        {"prompt": "Q:", "chosen": " a", "rejected": [ANSWER_GREEN]},
        r"fields 'chosen' and 'rejected' mix text and messages",
    ),
    "prompt-text-completions-messages": (
        {"prompt": "Q:", "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]},
        r"field 'prompt' and field 'chosen' mix text and messages",
    ),
    "message-without-role": (
        {"prompt": [USER], "chosen": MSG_NO_ROLE, "rejected": [ANSWER_GREEN]},
        r"field 'chosen' message 0 must be an object with 'role' and 'content'",
    ),
    "message-without-content": (
        {"prompt": [USER], "chosen": [ANSWER_BLUE], "rejected": MSG_NO_CONTENT},
        r"field 'rejected' message 0 must be an object with 'role' and 'content'",
    ),
    "message-not-an-object": (
        {"prompt": [USER, "hi"], "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]},
        r"field 'prompt' message 1 must be an object with 'role' and 'content'",
    ),
    "message-content-not-a-string": (
        {"prompt": [USER], "chosen": MSG_INT_CONTENT, "rejected": [ANSWER_GREEN]},
        r"field 'chosen' message 0 'content' must be a string",
    ),
    "implicit-without-shared-prefix": (
        {"chosen": "yes", "rejected": "no"},
        r"no field 'prompt' and fields 'chosen'/'rejected' share no prefix",
    ),
}


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_raises_data_error_naming_file_line_and_field(record, message, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, record, GOOD])
    with pytest.raises(DataError, match=loc(path, 2) + " " + message):
        prepare(path, tokenizer, empty_completions="error")


def test_malformed_jsonl_line_names_its_line_number(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, '{"prompt": "Q:", "chosen": ', GOOD])
    with pytest.raises(DataError, match=loc(path, 3) + r" malformed JSON \(.* at column \d+\)"):
        prepare(path, tokenizer)


def test_blank_jsonl_lines_are_skipped_but_still_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", "   ", {"prompt": "Q:", "chosen": " a"}])
    with pytest.raises(DataError, match=loc(path, 4) + r" missing field 'rejected'"):
        prepare(path, tokenizer)


def test_jsonl_value_that_is_not_an_object_is_rejected(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '["Q:", " a", " b"]'])
    with pytest.raises(DataError, match=loc(path, 2) + r" expected a JSON object, got a JSON array"):
        prepare(path, tokenizer)


def test_malformed_json_file_names_the_line_of_the_error(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "Q:", "chosen": " a", "rejected": " b"},\n  {"prompt": oops}\n]\n')
    with pytest.raises(DataError, match=loc(path, 3) + r" malformed JSON"):
        prepare(path, tokenizer)


def test_json_item_that_is_not_an_object_names_its_index(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, "not a record"]))
    with pytest.raises(DataError, match=re.escape(f"{path}: item 1: expected a JSON object, got a string")):
        prepare(path, tokenizer)


def test_json_file_that_is_not_a_list_is_rejected(tokenizer, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"rows": [GOOD]}))
    with pytest.raises(DataError, match=re.escape(f"{path}: expected a JSON list of objects")):
        prepare(path, tokenizer)


def test_tokenizer_without_eos_is_rejected(tmp_path):
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    assert no_eos.eos_token is None
    with pytest.raises(DataError, match=r"tokenizer has no eos_token.*model\.eos_token"):
        prepare([GOOD], no_eos)


def test_conversational_records_need_a_chat_template(tmp_path):
    no_template = build_tokenizer(chat_template=False)
    record = {"prompt": [USER], "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]}
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    with pytest.raises(DataError, match=loc(path, 1) + r" conversational records need a chat template"):
        prepare(path, no_template)


def test_standard_records_need_no_chat_template():
    no_template = build_tokenizer(chat_template=False)
    (pair,), _ = prepare([GOOD], no_template)
    assert pair.prompt_ids == ids(no_template, PROMPT)


def test_conversational_record_after_standard_ones_still_needs_a_chat_template(tmp_path):
    no_template = build_tokenizer(chat_template=False)
    record = {"prompt": [USER], "chosen": [ANSWER_BLUE], "rejected": [ANSWER_GREEN]}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, record])
    with pytest.raises(DataError, match=loc(path, 2) + r" conversational records need a chat template"):
        prepare(path, no_template)


def test_unsupported_file_suffix_is_rejected(tokenizer, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: unsupported file type '.txt'")):
        prepare(path, tokenizer)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.csv", "missing.parquet"])
def test_missing_data_file_is_reported_not_looked_up_on_the_hub(name, tokenizer, tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a missing local file must not be looked up on the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    path = tmp_path / name
    with pytest.raises(DataError, match=re.escape(f"{path}: no such file")):
        prepare(path, tokenizer)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("header-only.csv", "prompt,chosen,rejected\n")],
)
def test_file_without_records_is_rejected(name, content, tokenizer, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}: no records")):
        prepare(path, tokenizer)


def test_empty_json_file_is_reported_as_malformed_at_line_1(tokenizer, tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("")
    with pytest.raises(DataError, match=loc(path, 1) + " malformed JSON"):
        prepare(path, tokenizer)


def test_csv_with_a_byte_order_mark_keeps_its_prompt_column(tokenizer, tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,chosen,rejected\nQ: why?, because, no\n".encode())
    (pair,), _ = prepare(path, tokenizer)
    assert pair.prompt_ids == ids(tokenizer, "Q: why?")


def test_a_missing_prompt_field_among_other_fields_warns_that_the_prompt_is_implicit(tokenizer):
    record = {"question": "Q:", "chosen": "Q: yes", "rejected": "Q: no"}
    with pytest.warns(
        UserWarning, match=r"record 0: field 'prompt' is missing or null \(other fields: question\)"
    ):
        prepare([record], tokenizer)


def test_a_text_prompt_beside_full_conversations_takes_the_prompt_from_them_as_trl_does(tokenizer):
    """UltraFeedback stores the user turn twice: as text in 'prompt' and inside chosen/rejected."""
    user = {"role": "user", "content": "What is DPO?"}
    record = {
        "prompt": "What is DPO?",
        "chosen": [user, {"role": "assistant", "content": "A way to align models."}],
        "rejected": [user, {"role": "assistant", "content": "No idea."}],
    }
    (pair,), _ = prepare_pairs([record], tokenizer, DataConfig(), progress=False)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|user|>\nWhat is DPO?</s>\n<|assistant|>\n")
    assert tokenizer.decode(pair.chosen_ids) == "A way to align models.</s>\n"
