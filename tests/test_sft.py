"""Supervised fine-tuning: which tokens carry the loss for each record kind, bad records, the command."""

import json

import pytest
import yaml

from preftune.cli import main
from preftune.config import DataConfig
from preftune.data.sft import prepare_sft, tokenize_sft
from preftune.errors import DataError
from preftune.experiments.synthetic import tiny_llama

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "and now?"},
    {"role": "assistant", "content": "bye"},
]


def _masked(tokenizer, record, completion_only=True):
    ids, mask = tokenize_sft(tokenizer, record, "r", DataConfig(), completion_only)
    assert len(ids) == len(mask)
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]), ids, mask


def test_prompt_completion_text_puts_the_loss_on_the_completion_and_its_eos_only(tokenizer):
    trained, ids, mask = _masked(tokenizer, {"prompt": "review of the park:", "completion": " great calm"})
    assert trained == " great calm</s>"
    assert tokenizer.decode(ids) == "<s>review of the park: great calm</s>"
    assert mask[0] == 0


def test_prompt_completion_messages_put_the_loss_on_the_assistant_reply_only(tokenizer):
    record = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}
    trained, _, _ = _masked(tokenizer, record)
    assert trained == "hello</s>\n"


def test_a_conversation_puts_the_loss_on_every_assistant_turn_and_nothing_else(tokenizer):
    trained, ids, mask = _masked(tokenizer, {"messages": CONVERSATION})
    assert trained == "hello</s>\nbye</s>\n"
    untrained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Be brief." in untrained and "and now?" in untrained and "hello" not in untrained


def test_plain_text_puts_the_loss_on_every_token(tokenizer):
    _, ids, mask = _masked(tokenizer, {"text": "The quick brown fox."})
    assert mask == [1] * len(ids) and tokenizer.decode(ids).endswith("</s>")


def test_completion_only_false_puts_the_loss_on_every_token_of_every_kind(tokenizer):
    for record in ({"prompt": "review:", "completion": " great"}, {"messages": CONVERSATION}):
        _, ids, mask = _masked(tokenizer, record, completion_only=False)
        assert mask == [1] * len(ids)


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"question": "a", "answer": "b"},
            "expected fields 'prompt' and 'completion', or 'messages', or 'text' (fields present: answer, question)",
        ),
        ({"completion": " b"}, "field 'completion' needs a field 'prompt'"),
        ({"prompt": "a", "completion": ""}, "field 'completion' is an empty completion"),
        (
            {"prompt": "a", "completion": 3},
            "field 'completion' must be a string or a list of messages, got int",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "field 'messages' has no assistant turn to learn from",
        ),
        ({"messages": [{"role": "gpt", "content": "hi"}]}, "message 0 has role 'gpt'"),
        ({"text": "  "}, "field 'text' must be non-empty text"),
    ],
)
def test_a_bad_sft_record_is_named_with_its_line_and_field(tmp_path, tokenizer, record, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: .*{message.replace('(', '.').replace(')', '.')}"):
        prepare_sft(str(path), tokenizer, DataConfig(empty_completions="error"), progress=False)


def test_over_the_length_limit_a_sequence_keeps_its_start(tokenizer):
    records = [{"prompt": "review of the park:", "completion": " great calm bright kind warm"}]
    (whole,), _ = prepare_sft(records, tokenizer, DataConfig(max_length=None), progress=False)
    limit = len(whole.input_ids) - 3
    (cut,), report = prepare_sft(records, tokenizer, DataConfig(max_length=limit), progress=False)
    assert cut.input_ids == whole.input_ids[:limit] and cut.loss_mask == whole.loss_mask[:limit]
    assert report.truncated == 1


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    tiny_llama(len(tokenizer), seed=2).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


QUIET = ["--set", "train.progress=false", "--set", "train.report_to=none", "--set", "train.max_steps=3",
         "--set", "train.batch_size=4", "--set", "train.learning_rate=1e-3"]  # fmt: skip


def test_preftune_sft_trains_on_mixed_record_kinds_and_saves_a_final_model(tmp_path, model_dir, capsys):
    data = tmp_path / "sft.jsonl"
    records = [{"prompt": "review of the park:", "completion": " great calm"}, {"messages": CONVERSATION},
               {"text": "The quick brown fox."}, {"prompt": "review of the song:", "completion": " dull"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (
        main(
            ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "out"), *QUIET]
        )
        == 0
    )
    assert "loss on completions and assistant turns" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "mean_token_accuracy", "entropy", "num_tokens", "sequences_per_second"} <= set(rows[-1])
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_an_sft_stage_feeds_a_dpo_stage_in_a_pipeline(tmp_path, model_dir):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps({"prompt": "review:", "completion": c}) + "\n" for c in (" great", " calm"))
    )
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join(
            json.dumps({"prompt": "review:", "chosen": " great", "rejected": r}) + "\n"
            for r in (" dull", " cold")
        )
    )
    train = {"max_steps": 2, "batch_size": 2, "progress": False, "report_to": ["none"]}
    stages = {
        "sft": {"model": {"name_or_path": str(model_dir)}, "data": {"path": str(sft)}, "train": train},
        "dpo": {"model": {"name_or_path": "${sft.final}"}, "data": {"path": str(prefs)}, "train": train},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "stages": stages}, sort_keys=False))
    assert main(["pipeline", "run", str(path)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [row["status"] for row in summary["stages"]] == ["ran", "ran"]
    assert json.loads((tmp_path / "out" / "dpo" / "config.json").read_text())["model"]["name_or_path"] == str(
        tmp_path / "out" / "sft" / "final"
    )
