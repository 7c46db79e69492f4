"""preftune's tokenization and truncation give exactly TRL 1.x's ids and batches.

TRL's ``DPOTrainer._prepare_dataset`` is called unbound (it only needs ``self._tokenizer``
for the EOS text), so no model or trainer is built.
"""

from __future__ import annotations

import types

import datasets
import pytest
import torch

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from preftune.config import DataConfig  # noqa: E402
from preftune.data import prepare_pairs  # noqa: E402
from preftune.data.layouts import collate_pairs  # noqa: E402

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What colour is the sky?"}
USER2 = {"role": "user", "content": "And the sun?"}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


STANDARD = [
    {
        "prompt": "Question: what colour is the sky? Answer:",
        "chosen": " it is blue.",
        "rejected": " it is green.",
    },
    # "pa" + "rk" merges into "ar": the prompt's last token is not a prefix of prompt + completion.
    {"prompt": "review of the pa", "chosen": "rk: great calm", "rejected": "rk: awful"},
    # A trailing space merges with the completion's first word.
    {"prompt": "review of the park: ", "chosen": "great", "rejected": "dull and cold"},
    # "th" + "ere" merges into "the"; the chosen completion already ends with EOS.
    {"prompt": "Hello th", "chosen": "ere, how are you?</s>", "rejected": "ank you."},
    {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps.</s>"},
    {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
]

CONVERSATIONAL = [
    {"prompt": [USER], "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
    {
        "prompt": [SYSTEM, USER, assistant("Blue."), USER2],
        "chosen": [assistant("It is bright.")],
        "rejected": [assistant("It is cold and dull.")],
    },
    {"prompt": [USER2], "chosen": [assistant("Warm and kind.")], "rejected": [assistant("no")]},
]

IMPLICIT_TEXT = [
    {
        # Answers that differ from their first word: TRL cuts at the turn marker too. (Answers that
        # share their first words keep them in the completions here, not in TRL:
        # test_data_real.py compares those with TRL given the prompt cut at the marker.)
        "chosen": "\n\nHuman: what colour is the sky?\n\nAssistant: it is blue.",
        "rejected": "\n\nHuman: what colour is the sky?\n\nAssistant: green, I think.",
    },
    # Diverge mid-word: the shared prefix ends with "pa" / "th", whose last token merges with the
    # chosen completion ("ar", "the").
    {"chosen": "review of the park: great calm", "rejected": "review of the pace: dull"},
    {"chosen": "Hello there, how are you?", "rejected": "Hello thank you."},
    {"chosen": "review of the park: great calm", "rejected": "review of the park: awful"},
]

IMPLICIT_CONVERSATIONS = [
    {"chosen": [USER, assistant("It is blue.")], "rejected": [USER, assistant("It is green.")]},
    {
        "chosen": [SYSTEM, USER, assistant("Blue."), USER2, assistant("Bright.")],
        "rejected": [SYSTEM, USER, assistant("Blue."), USER2, assistant("Cold and murky.")],
    },
]

DATASETS = {
    "standard": STANDARD,
    "conversational": CONVERSATIONAL,
    "implicit-text": IMPLICIT_TEXT,
    "implicit-conversations": IMPLICIT_CONVERSATIONS,
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def trl_prepare(records, tokenizer, tmp_path, max_length):
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        truncation_mode="keep_start",
        dataset_num_proc=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    fake_trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    dataset = datasets.Dataset.from_list(records)
    return DPOTrainer._prepare_dataset(fake_trainer, dataset, tokenizer, args, "train")


def preftune_prepare(records, tokenizer, max_length):
    return prepare_pairs(records, tokenizer, DataConfig(max_length=max_length), progress=False)


@pytest.mark.parametrize("records", DATASETS.values(), ids=DATASETS.keys())
def test_token_ids_equal_trl_dpo_trainer_prepare_dataset(records, tokenizer, tmp_path):
    theirs = trl_prepare(records, tokenizer, tmp_path, max_length=None)
    ours, report = preftune_prepare(records, tokenizer, max_length=None)
    assert report.kept == len(theirs) == len(records)
    for pair, row in zip(ours, theirs, strict=True):
        assert pair.prompt_ids == row["prompt_ids"], pair.where
        assert pair.chosen_ids == row["chosen_ids"], pair.where
        assert pair.rejected_ids == row["rejected_ids"], pair.where


@pytest.mark.parametrize("records", [STANDARD, IMPLICIT_TEXT], ids=["standard", "implicit-text"])
def test_boundary_merging_records_are_exercised(records, tokenizer, tmp_path):
    """Guard for the equality test: some prompt's own tokens are not a prefix of prompt + completion,
    so the common-prefix rule decides where the completion starts."""
    theirs = trl_prepare(records, tokenizer, tmp_path, max_length=None)
    merged = [row for row in theirs if len(row["prompt_ids"]) < len(tokenizer(row["prompt"])["input_ids"])]
    assert len(merged) >= 2


# Each max_length drops at least one pair (prompt fills it), truncates some completions
# and leaves at least one pair whole, which the test checks before comparing.
TRUNCATION_CASES = {
    "standard": (STANDARD, 16),
    "conversational": (CONVERSATIONAL, 26),
    "implicit-text": (IMPLICIT_TEXT, 19),
}


@pytest.mark.filterwarnings("ignore:.*pair dropped:UserWarning")
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize(("records", "max_length"), TRUNCATION_CASES.values(), ids=TRUNCATION_CASES.keys())
def test_truncated_batch_equals_trl_collator_keep_start(
    records, max_length, pad_to_multiple_of, tokenizer, tmp_path
):
    theirs = trl_prepare(records, tokenizer, tmp_path, max_length=max_length)
    ours, report = preftune_prepare(records, tokenizer, max_length=max_length)

    untruncated, _ = preftune_prepare(records, tokenizer, max_length=None)
    whole = [
        p
        for p in untruncated
        if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= max_length
    ]
    assert report.dropped_overlong_prompt >= 1
    assert report.completion_truncated >= 1
    assert whole

    assert len(theirs) == len(ours) == report.kept
    assert [row["prompt_ids"] for row in theirs] == [p.prompt_ids for p in ours]

    pad = tokenizer.pad_token_id
    collator = DataCollatorForPreference(
        pad_token_id=pad,
        max_length=max_length,
        truncation_mode="keep_start",
        pad_to_multiple_of=pad_to_multiple_of,
    )
    # TRL truncates in the collator from the untruncated ids its dataset holds.
    expected = collator(
        [
            {"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
            for r in theirs
        ]
    )
    batch = collate_pairs(ours, pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(batch, key), expected[key]), key
