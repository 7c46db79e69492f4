"""The public preference formats as users have them (``tests/fixtures/datasets``: HH-RLHF,
UltraFeedback-binarized, SHP, TRL's four formats) train as they are: where the prompt is cut, what
an empty final turn becomes, which response a label picks, the scores as a margin. Token ids are
compared with TRL's own ``_prepare_dataset`` wherever TRL cuts the same way.
"""

from __future__ import annotations

import json
import types

import datasets
import pytest
from real_chat import real_tokenizer, records

from preftune.config import DataConfig, load_config
from preftune.data import DataError, prepare_pairs, prepare_unpaired, split_implicit_prompt
from preftune.errors import ConfigError

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

SHP = {
    "prompt_field": "history",
    "response_fields": ["human_ref_A", "human_ref_B"],
    "preference_field": "labels",
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def llama():
    return real_tokenizer("llama3_1")


def prepare(source, tokenizer, **settings):
    return prepare_pairs(source, tokenizer, DataConfig(max_length=None, **settings), progress=False)


def trl_dpo(rows, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, bf16=False)
    fake_trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    return DPOTrainer._prepare_dataset(
        fake_trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train"
    )


def trl_kto(rows, tokenizer, tmp_path):
    args = KTOConfig(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, bf16=False)
    fake_trainer = types.SimpleNamespace(
        _tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    return KTOTrainer._prepare_dataset(
        fake_trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train"
    )


def same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    for pair, row in zip(ours, theirs, strict=True):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
            row["prompt_ids"],
            row["chosen_ids"],
            row["rejected_ids"],
        ), pair.where


# --------------------------------------------------------------------------- HH-RLHF


def test_hh_rlhf_answers_that_share_their_first_words_keep_them_in_the_completions():
    record = records("hh_rlhf")[5]  # "The capital of Australia is Canberra." / "… is Sydney."
    prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    assert prompt.endswith("What is the capital of Australia?\n\nAssistant:")
    assert (chosen, rejected) == (
        " The capital of Australia is Canberra.",
        " The capital of Australia is Sydney.",
    )


def anthropic_prompt(text: str) -> str:
    """The DPO paper's own cut of an HH-RLHF text: up to its last "\n\nAssistant:"."""
    return text[: text.rindex("\n\nAssistant:") + len("\n\nAssistant:")]


def test_hh_rlhf_ids_equal_trls_given_the_prompt_the_dpo_paper_cuts(llama, tmp_path):
    """Multi-turn records included; TRL's character-level cut alone would train "The capital of
    Australia is" as prompt."""
    rows = [r for r in records("hh_rlhf") if r["chosen"].strip() and not r["chosen"].endswith("Assistant:")]
    rows = [r for r in rows if not r["rejected"].endswith("Assistant: ")]
    explicit = []
    for r in rows:
        prompt = anthropic_prompt(r["chosen"])
        explicit.append(
            {"prompt": prompt, "chosen": r["chosen"][len(prompt) :], "rejected": r["rejected"][len(prompt) :]}
        )
    ours, _ = prepare(rows, llama)
    assert len(ours) == 6
    same_ids(ours, trl_dpo(explicit, llama, tmp_path))


def test_hh_rlhf_an_answer_that_is_a_prefix_of_the_other_stays_whole():
    record = records("hh_rlhf")[6]  # rejected "Sure." is the start of chosen "Sure. Boil them …"
    prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    assert prompt.endswith("\n\nAssistant:") and rejected == " Sure." and chosen.startswith(" Sure. Boil")


def test_hh_rlhf_turn_words_inside_a_turn_are_not_turn_markers():
    record = records("hh_rlhf")[7]  # 'Assistant: enabled' inside the human's question and the answers
    prompt, chosen, _ = split_implicit_prompt(record["chosen"], record["rejected"])
    assert prompt.endswith("Is that valid YAML?\n\nAssistant:") and chosen.startswith(
        ' Yes. "Assistant: enabled"'
    )


@pytest.mark.parametrize("index", [3, 4], ids=["with-its-space", "without-its-space"])
def test_hh_rlhf_an_empty_final_turn_is_an_empty_completion_not_a_shorter_prompt(index):
    record = records("hh_rlhf")[index]
    prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    assert prompt.endswith("\n\nAssistant:")
    assert "" in (chosen.strip(), rejected.strip())


def test_empty_completions_are_dropped_by_default_and_counted_with_their_lines(llama, tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records("hh_rlhf")))
    pairs, report = prepare(path, llama)
    finding = report.findings.by_rule["empty_completion"]
    assert (len(pairs), finding.count, finding.wheres) == (6, 2, [f"{path}:4", f"{path}:5"])
    assert (
        f"empty completion: 2 records (data.empty_completions=drop) at {path}:4, {path}:5; first: field 'rejected'"
        in report.summary()
    )


def test_empty_completions_error_names_the_file_line_and_field(llama, tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records("hh_rlhf")))
    with pytest.raises(DataError) as caught:
        prepare(path, llama, empty_completions="error")
    assert str(caught.value).startswith(f"{path}:4: field 'rejected' is an empty completion")
    assert f"{path}:5: field 'chosen' is an empty completion" in str(caught.value)


def test_empty_completions_keep_trains_an_eos_only_completion_as_trl_does(llama, tmp_path):
    record = records("hh_rlhf")[4]  # chosen ends with an empty "\n\nAssistant:"
    (pair,), _ = prepare([record], llama, empty_completions="keep")
    prompt = anthropic_prompt(record["chosen"])
    rejected = record["rejected"][len(prompt) :]
    (theirs,) = trl_dpo([{"prompt": prompt, "chosen": "", "rejected": rejected}], llama, tmp_path)
    assert pair.chosen_ids == [llama.eos_token_id] == theirs["chosen_ids"]
    assert (pair.prompt_ids, pair.rejected_ids) == (theirs["prompt_ids"], theirs["rejected_ids"])


def test_an_empty_assistant_message_kept_trains_the_templates_end_of_turn(tmp_path):
    qwen = real_tokenizer("qwen2_5")
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": ""}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    (pair,), _ = prepare([record], qwen, empty_completions="keep")
    assert qwen.decode(pair.chosen_ids) == "<|im_end|>\n"


# --------------------------------------------------------------------------- UltraFeedback


def test_ultrafeedback_prompt_is_the_user_turn_and_ids_equal_trls_on_the_conversations(llama, tmp_path):
    rows = records("ultrafeedback_binarized")
    ours, report = prepare(rows, llama)
    # TRL reads a text prompt beside conversations as text; given the conversations alone it
    # extracts the same prompt.
    theirs = trl_dpo([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows], llama, tmp_path)
    assert report.kept == 5
    same_ids(ours, theirs)


def test_ultrafeedback_scores_give_the_reward_models_margin(llama):
    rows = records("ultrafeedback_binarized")
    pairs, _ = prepare_pairs(
        rows,
        llama,
        DataConfig(score_fields=["score_chosen", "score_rejected"]),
        progress=False,
        margin_field="scores",
    )
    assert [p.margin for p in pairs] == [r["score_chosen"] - r["score_rejected"] for r in rows]


def test_a_score_margin_without_score_fields_is_refused_before_reading(llama):
    with pytest.raises(ConfigError, match=r"rm.margin_field=scores takes the margin from data.score_fields"):
        prepare_pairs(
            records("ultrafeedback_binarized"), llama, DataConfig(), progress=False, margin_field="scores"
        )


# --------------------------------------------------------------------------- SHP


def test_shp_label_picks_the_chosen_response(llama):
    rows = records("shp")
    pairs, _ = prepare(rows, llama, **SHP)
    for pair, row in zip(pairs, rows, strict=True):
        preferred = row["human_ref_A"] if row["labels"] == 1 else row["human_ref_B"]
        assert llama.decode(pair.chosen_ids, skip_special_tokens=True) == preferred


def test_shp_pairs_equal_trls_once_the_label_has_picked(llama, tmp_path):
    rows = records("shp")
    explicit = [
        {
            "prompt": r["history"],
            "chosen": r["human_ref_A"] if r["labels"] == 1 else r["human_ref_B"],
            "rejected": r["human_ref_B"] if r["labels"] == 1 else r["human_ref_A"],
        }
        for r in rows
    ]
    ours, _ = prepare(rows, llama, **SHP)
    same_ids(ours, trl_dpo(explicit, llama, tmp_path))


def test_shp_without_a_label_field_the_higher_score_is_chosen(llama):
    rows = [{**r, "labels": None} for r in records("shp")]
    settings = {**SHP, "preference_field": None, "score_fields": ["score_A", "score_B"]}
    pairs, _ = prepare(rows, llama, **settings)
    for pair, row in zip(pairs, rows, strict=True):
        preferred = row["human_ref_A"] if row["score_A"] > row["score_B"] else row["human_ref_B"]
        assert llama.decode(pair.chosen_ids, skip_special_tokens=True) == preferred


def test_shp_a_label_that_prefers_neither_response_drops_the_record_and_says_why(llama):
    rows = records("shp")
    rows[1] = {**rows[1], "labels": "tie"}
    pairs, report = prepare(rows, llama, **SHP)
    finding = report.findings.by_rule["no_preference"]
    assert (len(pairs), finding.count, finding.wheres) == (4, 1, ["record 1"])
    assert "field 'labels' is 'tie'" in finding.example


def test_shp_preference_values_name_other_labels(llama):
    rows = [{**r, "winner": "model_a" if r["labels"] == 1 else "model_b"} for r in records("shp")]
    settings = {**SHP, "preference_field": "winner", "preference_values": ["model_a", "model_b"]}
    ours, _ = prepare(rows, llama, **settings)
    label_picked, _ = prepare(records("shp"), llama, **SHP)
    assert [p.chosen_ids for p in ours] == [p.chosen_ids for p in label_picked]


def test_shp_a_missing_response_field_is_named(llama):
    rows = records("shp")
    del rows[2]["human_ref_B"]
    with pytest.raises(DataError, match=r"record 2: missing field 'human_ref_B'"):
        prepare(rows, llama, **SHP)


# --------------------------------------------------------------------------- TRL's four formats


@pytest.mark.parametrize("name", ["trl_standard", "trl_conversational", "trl_implicit"])
def test_trl_preference_formats_give_trls_ids(name, llama, tmp_path):
    ours, _ = prepare(records(name), llama)
    same_ids(ours, trl_dpo(records(name), llama, tmp_path))


def test_trl_unpaired_format_gives_trls_kto_ids(llama, tmp_path):
    ours, _ = prepare_unpaired(records("trl_unpaired"), llama, DataConfig(max_length=None), progress=False)
    theirs = trl_kto(records("trl_unpaired"), llama, tmp_path)
    assert [(e.prompt_ids, e.completion_ids) for e in ours] == [
        (row["prompt_ids"], row["completion_ids"]) for row in theirs
    ]


# --------------------------------------------------------------------------- the settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.response_fields=[human_ref_A]"], r"data.response_fields: names two fields"),
        (
            ["data.response_fields=[a,b]"],
            r"data.response_fields: needs data.preference_field or data.score_fields",
        ),
        (["data.preference_field=labels"], r"data.preference_field: needs data.response_fields"),
        (["data.preference_values=[1,1]"], r"data.preference_values: two different values"),
        (["data.empty_completions=skip"], r"data.empty_completions: 'skip' is not one of"),
    ],
)
def test_field_mapping_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_a_pair_mapping_is_refused_by_a_command_that_reads_no_pairs():
    with pytest.raises(ConfigError, match=r"data.response_fields is read by .*, not by 'preftune sft'"):
        load_config(overrides=["data.response_fields=[a,b]", "data.score_fields=[x,y]"], command="sft")
