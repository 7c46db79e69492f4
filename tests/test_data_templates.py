"""Real chat templates (``tests/fixtures/chat_templates``) checked, not trusted: every record's
rendering is checked, what a template changes is said (how many records, one example), the
settings decide what is trained, and token ids equal TRL's wherever TRL trains the same thing.
"""

from __future__ import annotations

import functools
import json
import types

import datasets
import pytest
from real_chat import TEMPLATES, real_tokenizer, records, trl_template

from preftune.config import DataConfig
from preftune.data import DataError, prepare_pairs, prepare_unpaired
from preftune.data.prompts import read_prompts
from preftune.data.sft import prepare_sft, tokenize_sft

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

ALL_TEMPLATES = sorted(path.stem for path in TEMPLATES.glob("*.json"))
NO_SYSTEM = ("gemma2", "mistral_7b_v0_1", "mistral_small_3_1")
"""Templates that refuse a system message (Mistral-Small's fails on a plain-text one)."""

USER = {"role": "user", "content": "What is 2+2?"}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
THINKING = "<think>\nI add two and two.\n</think>\n\n2+2 equals 4."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    }
]


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def pair(chosen: str, rejected: str = "5.", prompt: list | None = None, **extra) -> dict:
    return {"prompt": prompt or [USER], "chosen": [answer(chosen)], "rejected": [answer(rejected)], **extra}


@functools.cache
def tok(name: str, training: str | None = None):
    """One tokenizer per template for the module; tests do not change it."""
    return real_tokenizer(name, trl_template(training) if training else None)


def prepare(source, tokenizer, **settings):
    return prepare_pairs(source, tokenizer, DataConfig(max_length=None, **settings), progress=False)


def findings(source, tokenizer, **settings):
    _, report = prepare(source, tokenizer, **settings)
    return report.findings.by_rule


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def trl_dpo(rows, tokenizer, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, bf16=False)
    fake_trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    return DPOTrainer._prepare_dataset(
        fake_trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train"
    )


def same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    for ours_pair, row in zip(ours, theirs, strict=True):
        assert (ours_pair.prompt_ids, ours_pair.chosen_ids, ours_pair.rejected_ids) == (
            row["prompt_ids"],
            row["chosen_ids"],
            row["rejected_ids"],
        ), ours_pair.where


def template_ids(tokenizer, messages, **kwargs):
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    )


# --------------------------------------------------------------------------- TRL conformance


@pytest.mark.parametrize("name", ALL_TEMPLATES)
@pytest.mark.parametrize("form", ["trl_conversational", "trl_implicit"])
def test_ordinary_records_give_trls_ids_with_every_real_template(form, name, tmp_path):
    rows = records(form)
    if name in NO_SYSTEM:
        rows = [
            r for r in rows if not (isinstance(r.get("prompt"), list) and r["prompt"][0]["role"] == "system")
        ]
    ours, _ = prepare(rows, tok(name))
    same_ids(ours, trl_dpo(rows, tok(name), tmp_path))


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("qwen2_5", {"tools": TOOLS}),
        ("qwen3", {"tools": TOOLS}),
        ("qwen3", {"chat_template_kwargs": {"enable_thinking": False}}),
        ("glm4_5", {"chat_template_kwargs": {"enable_thinking": False}}),
    ],
    ids=["qwen2_5-tools", "qwen3-tools", "qwen3-no-thinking", "glm4_5-no-thinking"],
)
def test_per_record_tools_and_chat_template_kwargs_reach_the_template_as_trl_passes_them(
    name, extra, tmp_path
):
    rows = [pair("2+2 equals 4.", **extra), pair("4.", "Five.", **extra)]
    ours, _ = prepare(rows, tok(name))
    plain, _ = prepare([pair("2+2 equals 4.")], tok(name))
    assert ours[0].prompt_ids != plain[0].prompt_ids  # the fields changed what the template rendered
    same_ids(ours, trl_dpo(rows, tok(name), tmp_path))


def test_a_record_without_tools_passes_no_tools_argument_to_the_template(monkeypatch):
    tokenizer = real_tokenizer("phi4_mini")
    seen = []
    render = tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.append(kwargs)
        return render(messages, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)
    prepare([pair("4.")], tokenizer)
    assert seen and all("tools" not in kwargs for kwargs in seen)


def test_tools_given_as_json_text_are_read_as_the_schemas(tmp_path):
    as_text, _ = prepare([pair("4.", tools=json.dumps(TOOLS))], tok("qwen2_5"))
    as_list, _ = prepare([pair("4.", tools=TOOLS)], tok("qwen2_5"))
    assert as_text[0].prompt_ids == as_list[0].prompt_ids


def test_chat_template_kwargs_that_preftune_passes_itself_are_refused():
    with pytest.raises(DataError, match=r"record 0: field 'chat_template_kwargs' sets add_generation_prompt"):
        prepare([pair("4.", chat_template_kwargs={"add_generation_prompt": False})], tok("qwen3"))


# --------------------------------------------------------------------------- template errors


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("gemma2", "System role not supported"),
        ("mistral_7b_v0_1", "Conversation roles must alternate user/assistant/user/assistant/..."),
        ("mistral_small_3_1", "'str object' has no attribute 'text' (UndefinedError)"),
    ],
)
def test_a_template_that_refuses_the_messages_is_a_data_error_naming_the_line(name, reason, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [pair("4."), pair("4.", prompt=[SYSTEM, USER]), pair("4."), {"prompt": [USER]}]
        )
        + "\n"
    )
    with pytest.raises(DataError) as caught:
        prepare(path, tok(name))
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}:2: the chat template refused the messages: {reason}"
    assert lines[2].startswith(f"  {path}:4: missing field 'chosen'")  # the other bad records too


def test_a_template_error_in_sft_records_is_a_data_error_naming_the_line(tmp_path):
    rows = [{"messages": [USER, answer("4.")]}, {"messages": [SYSTEM, USER, answer("4.")]}]
    with pytest.raises(DataError, match=r"^record 1: the chat template refused the messages: System role"):
        prepare_sft(rows, tok("gemma2"), DataConfig(), progress=False)


def test_a_template_error_in_rollout_prompts_is_a_data_error_naming_the_line():
    rows = [{"prompt": [USER]}, {"prompt": [SYSTEM, USER]}]
    with pytest.raises(DataError, match=r"^record 1: the chat template refused the messages: System role"):
        read_prompts(rows, DataConfig(), "train", tok("gemma2"))


# --------------------------------------------------------------------------- the prompt rendered alone


def test_a_generation_prompt_the_conversation_lacks_is_counted_and_shown_once():
    rows = [pair("4."), pair("It is 4."), pair("Four.", "Three.")]
    finding = findings(rows, tok("r1_distill_new"))["template_mismatch"]
    assert (finding.count, finding.setting) == (3, "data.template_mismatch=warn")
    assert finding.example == "'<think>\\n' ends the prompt rendered alone, not the conversation"


def test_nemotron_super_no_think_system_message_is_a_template_mismatch():
    rows = [pair("4.", prompt=[{"role": "system", "content": "/no_think"}, USER])]
    finding = findings(rows, tok("nemotron_super_v1_5"))["template_mismatch"]
    assert finding.example.startswith("'<think>\\n\\n</think>\\n\\n' ends the prompt")


def test_a_prompt_that_is_a_prefix_of_its_conversation_is_no_mismatch():
    rows = [pair("4.")]
    assert "template_mismatch" not in findings(rows, tok("r1_distill_old"))


def test_template_mismatch_error_stops_naming_the_line():
    with pytest.raises(
        DataError, match=r"^record 0: the chat template ends the prompt rendered alone with '<think>\\n'"
    ):
        prepare([pair("4.")], tok("r1_distill_new"), template_mismatch="error")


def test_template_mismatch_prompt_trains_the_generation_prompt_then_the_completion():
    tokenizer = tok("r1_distill_new")
    (ours,), _ = prepare([pair("2+2 equals 4.")], tokenizer, template_mismatch="prompt")
    generation_prompt = tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ours.prompt_ids) == generation_prompt  # ends with <think>\n, as at inference
    assert tokenizer.decode(ours.chosen_ids) == "2+2 equals 4.<｜end▁of▁sentence｜>"


# --------------------------------------------------------------------------- the answer as rendered


@pytest.mark.parametrize("name", ["r1_distill_old", "r1_distill_new", "nemotron_super_v1_5"])
def test_reasoning_the_template_strips_from_the_answer_is_reported(name):
    finding = findings([pair(THINKING), pair("4.")], tok(name))["stripped_content"]
    assert finding.count == 1
    assert finding.example == "'<think>\\nI add two and two.\\n</think>' is not in the rendered completion"


def test_reasoning_the_template_only_respaces_is_not_reported():
    assert "stripped_content" not in findings(
        [pair(THINKING)], tok("glm4_5")
    )  # "<think>I add…</think>\n2+2…"


def test_qwen3_empty_think_block_is_named_once_for_all_answers():
    finding = findings([pair("4."), pair("Four."), pair("It is 4.")], tok("qwen3"))["added_text"]
    assert finding.count == 3
    assert finding.example == "'<think>\\n\\n</think>\\n\\n' is added before the answer"


def test_glm_think_block_before_every_completion_is_named():
    finding = findings([pair("4.")], tok("glm4_5"))["added_text"]
    assert finding.example == "'\\n<think></think>\\n' is added before the answer"


def test_nemotron_nano_opening_the_think_tag_twice_is_named():
    finding = findings([pair(THINKING)], tok("nemotron_nano_v2"))["added_text"]
    assert finding.example == "the generation prompt ends with '<think>' and the answer opens it again"


def test_answers_the_template_keeps_as_written_have_no_findings():
    assert findings([pair("4."), pair(THINKING)], tok("qwen2_5")) == {}


# --------------------------------------------------------------------------- the end of a completion


def test_a_completion_with_no_stop_token_is_reported():
    finding = findings([pair("4."), pair("Four.")], tok("glm4_5"))["missing_eos"]
    assert (finding.count, finding.example) == (2, "ends '\\n<think></think>\\n4.'")


def test_missing_eos_append_ends_every_completion_with_eos():
    tokenizer = tok("glm4_5")
    (ours,), _ = prepare([pair("4.")], tokenizer, missing_eos="append")
    assert ours.chosen_ids[-1] == ours.rejected_ids[-1] == tokenizer.eos_token_id


def test_missing_eos_error_stops_naming_the_line_and_field():
    with pytest.raises(
        DataError, match=r"^record 0: field 'chosen' renders to a completion that ends with no EOS"
    ):
        prepare([pair("4.")], tok("glm4_5"), missing_eos="error")


@pytest.mark.parametrize("name", ["gemma2", "kimi_k2", "qwen2_5", "mistral_7b_v0_1"])
def test_an_end_of_turn_token_counts_as_the_stop(name):
    assert "missing_eos" not in findings([pair("4.")], tok(name))  # <end_of_turn>\n, <|im_end|>, "</s> "


# --------------------------------------------------------------------------- identical after the template


@pytest.mark.filterwarnings("ignore:1 pairs have chosen identical to rejected")
@pytest.mark.parametrize("name", ["llama3_1", "gemma2", "llama2_chat", "nemotron_nano_v2", "glm4_5"])
def test_answers_differing_only_in_whitespace_the_template_trims_are_identical_pairs(name):
    finding = findings([pair("Four.", "Four.  "), pair("4.")], tok(name))["identical_tokens"]
    assert (finding.count, finding.wheres) == (1, ["record 0"])


def test_identical_after_the_template_are_dropped_with_identical_pairs_drop():
    pairs, report = prepare([pair("Four.", "Four. "), pair("4.")], tok("llama3_1"), identical_pairs="drop")
    assert [p.where for p in pairs] == ["record 1"] and report.dropped_identical == 1


def test_identical_after_the_template_stop_with_identical_pairs_error():
    with pytest.raises(
        DataError, match=r"^record 0: fields 'chosen' and 'rejected' give identical token ids"
    ):
        prepare([pair("Four.", "Four. ")], tok("llama3_1"), identical_pairs="error")


def test_answers_differing_in_whitespace_a_template_keeps_are_not_identical():
    assert "identical_tokens" not in findings([pair("Four.", "Four. ")], tok("qwen2_5"))


# --------------------------------------------------------------------------- double BOS


def rendered_to_text(name: str) -> dict:
    tokenizer = tok(name)
    return {
        "prompt": tokenizer.apply_chat_template([USER], tokenize=False, add_generation_prompt=True),
        "chosen": "2+2 equals 4.",
        "rejected": "5.",
    }


def test_text_that_already_starts_with_bos_is_warned_as_double_bos():
    (ours,), report = prepare([rendered_to_text("llama3_1")], tok("llama3_1"))
    bos = tok("llama3_1").bos_token_id
    assert ours.prompt_ids[:2] == [bos, bos]  # TRL's ids, kept by default
    assert report.findings.by_rule["double_bos"].example.endswith("starts with the BOS text")


def test_double_bos_strip_removes_the_one_the_tokenizer_adds():
    (ours,), _ = prepare([rendered_to_text("llama3_1")], tok("llama3_1"), double_bos="strip")
    bos = tok("llama3_1").bos_token_id
    assert ours.prompt_ids[0] == bos and ours.prompt_ids[1] != bos


def test_double_bos_error_stops_naming_the_field():
    with pytest.raises(DataError, match=r"^record 0: field 'prompt' starts with '<\|begin_of_text\|>'"):
        prepare([rendered_to_text("llama3_1")], tok("llama3_1"), double_bos="error")


def test_text_of_a_tokenizer_that_adds_no_bos_is_no_double_bos():
    assert "double_bos" not in findings([rendered_to_text("qwen2_5")], tok("qwen2_5"))


def test_double_bos_is_warned_in_rollout_prompts_too():
    row = {"prompt": rendered_to_text("llama3_1")["prompt"]}
    with pytest.warns(UserWarning, match=r"records: double BOS: 1 record \(data.double_bos=warn\)"):
        read_prompts([row], DataConfig(), "train", tok("llama3_1"))


# --------------------------------------------------------------------------- {% generation %} masks


def test_a_template_marking_assistant_text_gives_the_completion_boundary():
    """TRL's Qwen2.5 training template marks the newline after "<|im_start|>assistant" as
    generated: the completion starts there, one token before the generation prompt's end."""
    tokenizer = tok("qwen2_5", "qwen2_5_training")
    (ours,), _ = prepare([pair("4.")], tokenizer)
    out = tokenizer.apply_chat_template(
        [USER, answer("4.")], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    start = out["assistant_masks"].index(1)
    assert ours.prompt_ids == out["input_ids"][:start] and ours.chosen_ids == out["input_ids"][start:]
    assert tokenizer.decode(ours.chosen_ids) == "\n4.<|im_end|>\n"


def test_sft_conversations_take_the_templates_own_assistant_mask():
    tokenizer = tok("qwen2_5", "qwen2_5_training")  # marks the newline before each answer too
    messages = [USER, answer("4."), {"role": "user", "content": "And 3+3?"}, answer("6.")]
    ids, mask = tokenize_sft(tokenizer, {"messages": messages}, "r", DataConfig(), True)
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert (ids, mask) == (list(out["input_ids"]), list(out["assistant_masks"]))


# --------------------------------------------------------------------------- tools everywhere


def test_tools_reach_sft_conversations():
    messages = [USER, answer("4.")]
    ids, _ = tokenize_sft(tok("qwen2_5"), {"messages": messages, "tools": TOOLS}, "r", DataConfig(), True)
    assert ids == template_ids(tok("qwen2_5"), messages, tools=TOOLS)


def test_tools_reach_kto_examples_as_trl_passes_them(tmp_path):
    rows = [
        {"prompt": [USER], "completion": [answer("4.")], "label": True, "tools": TOOLS},
        {"prompt": [USER], "completion": [answer("5.")], "label": False, "tools": TOOLS},
    ]
    ours, _ = prepare_unpaired(rows, tok("qwen3"), DataConfig(max_length=None), progress=False)
    args = KTOConfig(output_dir=str(tmp_path), max_length=None, report_to=[], use_cpu=True, bf16=False)
    fake = types.SimpleNamespace(
        _tokenizer=tok("qwen3"), calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    theirs = KTOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(rows), tok("qwen3"), args, "train")
    assert [(e.prompt_ids, e.completion_ids) for e in ours] == [
        (r["prompt_ids"], r["completion_ids"]) for r in theirs
    ]


def test_tools_reach_reward_model_sequences():
    row = pair("4.", tools=TOOLS, margin=1.5)
    (ours,), _ = prepare_pairs([row], tok("qwen2_5"), DataConfig(), progress=False, margin_field="margin")
    assert ours.prompt_ids + ours.chosen_ids == template_ids(
        tok("qwen2_5"), [USER, answer("4.")], tools=TOOLS
    )


def test_tools_reach_eval_sets():
    from preftune.evaluation.evaluate import load_sets

    (loaded,) = load_sets([("tools", [pair("4.", tools=TOOLS)])], tok("qwen2_5"), DataConfig())
    prompt = template_ids(tok("qwen2_5"), [USER], tools=TOOLS, add_generation_prompt=True)
    assert loaded.pairs[0].prompt_ids == prompt


def test_tools_and_chat_template_kwargs_reach_rollout_prompts():
    row = {"prompt": [USER], "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    (prompt,) = read_prompts([row], DataConfig(), "train", tok("qwen3"))
    expected = template_ids(
        tok("qwen3"), [USER], tools=TOOLS, enable_thinking=False, add_generation_prompt=True
    )
    assert prompt.ids == expected


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("reader", ["pairs", "sft", "kto", "prompts"])
def test_half_a_surrogate_pair_is_a_data_error_naming_the_field_in_every_reader(reader):
    text = "Smile \ud83d please"
    tokenizer = tok("qwen2_5")
    with pytest.raises(DataError, match=r"^record 0: field 'prompt' holds half of a UTF-16 surrogate pair"):
        if reader == "pairs":
            prepare([{"prompt": text, "chosen": " a", "rejected": " b"}], tokenizer)
        elif reader == "sft":
            prepare_sft([{"prompt": text, "completion": " a"}], tokenizer, DataConfig(), progress=False)
        elif reader == "kto":
            rows = [{"prompt": text, "completion": " a", "label": True}]
            prepare_unpaired(rows, tokenizer, DataConfig(), progress=False)
        else:
            read_prompts([{"prompt": text}], DataConfig(), "train", tokenizer)
