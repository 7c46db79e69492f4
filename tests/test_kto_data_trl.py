"""preftune's unpaired data gives exactly TRL 1.16's KTO ids and batches: the unpairing order,
the token ids, the drop of prompts that fill ``max_length``, and the collated rows, both the
examples' own and the mismatched KL rows.

TRL's ``KTOTrainer._prepare_dataset`` is called unbound with a fake ``self`` (it reads the
tokenizer, whether KL is estimated and the two weights), and its own collator builds the batches
from the chunks its KL rotation used (``per_device_train_batch_size`` consecutive examples).
"""

from __future__ import annotations

import types

import datasets
import pytest
import torch
from test_data_trl import CONVERSATIONAL, IMPLICIT_CONVERSATIONS, IMPLICIT_TEXT, STANDARD, assistant

trl = pytest.importorskip("trl")
from trl import KTOConfig, KTOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference  # noqa: E402

from preftune.config import DataConfig  # noqa: E402
from preftune.data import prepare_unpaired  # noqa: E402
from preftune.data.layouts import SequenceBatch, collate_unpaired  # noqa: E402

USER = {"role": "user", "content": "What colour is the sky?"}
UNPAIRED_TEXT = [
    {"prompt": "review of the pa", "completion": "rk: great calm", "label": True},
    {"prompt": "Question: what colour is the sky? Answer:", "completion": " it is blue.", "label": True},
    {"prompt": "Hello th", "completion": "ank you.</s>", "label": False},
    {"prompt": "The quick brown fox", "completion": " sleeps.", "label": False},
    {"prompt": "Q:", "completion": " yes", "label": True},
]
UNPAIRED_CONVERSATIONS = [
    {"prompt": [USER], "completion": [assistant("It is blue.")], "label": True},
    {"prompt": [USER], "completion": [assistant("It is green and cold.")], "label": False},
    {
        "prompt": [{"role": "user", "content": "And the sun?"}],
        "completion": [assistant("Warm.")],
        "label": False,
    },
]
DATASETS = {
    "unpaired-text": UNPAIRED_TEXT,
    "unpaired-conversations": UNPAIRED_CONVERSATIONS,
    "pairs": STANDARD,
    "pairs-conversational": CONVERSATIONAL,
    "pairs-implicit-text": IMPLICIT_TEXT,
    "pairs-implicit-conversations": IMPLICIT_CONVERSATIONS,
}
BATCH = 3  # examples per micro-batch: TRL rotates the KL completions within chunks of this size


@pytest.fixture(autouse=True, scope="module")
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def trl_prepare(records, tokenizer, tmp_path, max_length):
    args = KTOConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        per_device_train_batch_size=BATCH,
        dataset_num_proc=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    fake_trainer = types.SimpleNamespace(
        _tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    return KTOTrainer._prepare_dataset(
        fake_trainer, datasets.Dataset.from_list(records), tokenizer, args, "train"
    )


def rows(batch: SequenceBatch) -> dict[str, torch.Tensor]:
    """The batch as TRL's collator lays it out: ids, attention mask, completion mask."""
    completion = torch.zeros_like(batch.input_ids).view(-1)
    completion[batch.label_index] = 1
    # TRL's mask also marks a completion's first token when it has no predecessor; none here does.
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "completion_mask": completion.view_as(batch.input_ids),
    }


@pytest.mark.parametrize("records", DATASETS.values(), ids=DATASETS.keys())
def test_examples_their_order_and_token_ids_equal_trl_kto_prepare_dataset(records, tokenizer, tmp_path):
    theirs = trl_prepare(records, tokenizer, tmp_path, max_length=None)
    ours, report = prepare_unpaired(records, tokenizer, DataConfig(max_length=None), progress=False)
    assert report.kept == len(theirs) == len(ours)
    for example, row in zip(ours, theirs, strict=True):
        assert example.desirable == row["label"], example.where
        assert example.prompt_ids == row["prompt_ids"], example.where
        assert example.completion_ids == row["completion_ids"], example.where


# Each max_length drops at least one example (its prompt fills it) and truncates some rows.
TRUNCATION_CASES = {
    "unpaired-text": (UNPAIRED_TEXT, 12),
    "pairs": (STANDARD, 12),
    "pairs-conversational": (CONVERSATIONAL, 20),
}


@pytest.mark.filterwarnings("ignore:.*example dropped:UserWarning")
@pytest.mark.parametrize("max_length", [None, "case"], ids=["whole", "truncated"])
@pytest.mark.parametrize(("records", "short"), TRUNCATION_CASES.values(), ids=TRUNCATION_CASES.keys())
def test_collated_rows_and_kl_rows_equal_trl_collator(records, short, max_length, tokenizer, tmp_path):
    """Micro-batches of 3 consecutive examples, as TRL's sequential sampler draws them: the
    examples' own rows and the KL rows (each prompt with the completion before it in the batch)."""
    limit = short if max_length == "case" else None
    theirs = trl_prepare(records, tokenizer, tmp_path, max_length=limit)
    ours, report = prepare_unpaired(records, tokenizer, DataConfig(max_length=limit), progress=False)
    if limit is not None:
        assert report.dropped_overlong_prompt >= 1
        assert report.completion_truncated >= 1
    assert len(ours) == len(theirs) >= BATCH
    collator = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=limit)
    for start in range(0, len(ours), BATCH):
        expected = collator([dict(theirs[i]) for i in range(start, min(start + BATCH, len(theirs)))])
        batch = collate_unpaired(ours[start : start + BATCH], tokenizer.pad_token_id, max_length=limit)
        assert batch.kl is not None
        assert torch.equal(batch.desirable, expected["label"])
        for prefix, layout in (("", batch.completions), ("KL_", batch.kl)):
            for key, value in rows(layout).items():
                assert torch.equal(value, expected[prefix + key]), f"{prefix}{key} at example {start}"
