"""End-to-end conformance: the same tiny Llama, records and hyperparameters in preftune and in
TRL's own DPOTrainer give the same per-step losses and rewards."""

import copy

import pytest
from datasets import Dataset
from helpers import TRL_METRICS, quiet_config, sentiment_records

from preftune.experiments.synthetic import tiny_llama
from preftune.recipes.dpo import train

trl = pytest.importorskip("trl")

RECORDS = [
    {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"},
    {"prompt": "Question: what colour is the sky?", "chosen": " It is blue.", "rejected": " green"},
    {"prompt": "Hello there,", "chosen": " how are you today?", "rejected": " fine."},
    *sentiment_records(5, seed=11),
]


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("ipo", 0.5)])
def test_five_steps_match_trl_dpo_trainer(tmp_path, tokenizer, loss_type, beta):
    base = tiny_llama(len(tokenizer), seed=3)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(RECORDS),
        max_steps=5,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        beta=beta,
        loss_type=[loss_type],
        max_length=128,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    reference = trl.DPOTrainer(
        model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=tokenizer,
    )
    reference.train()
    expected = [h for h in reference.state.log_history if "loss" in h]

    # One batch holds every pair, so both sides see the same pairs each step whatever the order.
    cfg = quiet_config(
        str(tmp_path / "preftune"),
        f"objective.loss={loss_type}",
        f"objective.beta={beta}",
        "train.max_steps=5",
        f"train.batch_size={len(RECORDS)}",
        "data.max_length=128",
    )
    got = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer, train_data=RECORDS).history

    assert len(got) == len(expected) == 5
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True), start=1):
        for name in TRL_METRICS:
            assert ours[name] == pytest.approx(theirs[name], abs=1e-4), f"step {step} {name}"
    assert got[-1]["loss"] < got[0]["loss"]  # it trained: the comparison is not between two idle runs
