"""End-to-end conformance: the same tiny Llama, records and hyperparameters in preftune's SFT
recipe and in TRL's own SFTTrainer give the same per-step losses, token accuracies, entropies and
gradient norms, with the loss on completion tokens only."""

import copy

import pytest
import torch
from datasets import Dataset
from helpers import quiet_config, sentiment_records
from transformers import TrainerCallback

from preftune.experiments.synthetic import tiny_llama
from preftune.recipes.sft import train_sft

trl = pytest.importorskip("trl")

STEPS, BATCH_SIZE = 5, 2
# One epoch: both sides visit the records in randperm(n, Generator().manual_seed(seed)) order.
RECORDS = [
    {"prompt": r["prompt"], "completion": r["chosen"]} for r in sentiment_records(STEPS * BATCH_SIZE, seed=7)
]
SFT_METRICS = ("loss", "grad_norm", "learning_rate")
# TRL averages these per micro-batch; preftune takes the token mean over the whole step. The two
# agree when a step is one micro-batch, and are compared there.
PER_MICRO_BATCH = ("mean_token_accuracy", "entropy")


class _Collect(TrainerCallback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **logs})


@pytest.mark.parametrize("grad_accum", [1, 2], ids=["one-micro-batch", "accumulating-two"])
def test_five_steps_match_trl_sft_trainer(tmp_path, tokenizer, grad_accum):
    base = tiny_llama(len(tokenizer), seed=4)
    batch_size = BATCH_SIZE // grad_accum
    collect = _Collect()
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        max_length=None,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        seed=42,
        disable_tqdm=True,
    )
    theirs_model, ours_model = copy.deepcopy(base), copy.deepcopy(base)
    reference = trl.SFTTrainer(
        model=theirs_model,
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=tokenizer,
        callbacks=[collect],
    )
    reference.train()
    expected = collect.rows

    cfg = quiet_config(
        str(tmp_path / "preftune"),
        f"train.batch_size={batch_size}",
        f"train.grad_accum={grad_accum}",
        f"train.max_steps={STEPS}",
        "train.scheduler=constant",
        "train.seed=42",
        "data.max_length=null",
    )
    got = train_sft(cfg, model=ours_model, tokenizer=tokenizer, train_data=RECORDS).history

    assert len(got) == len(expected) == STEPS
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True), start=1):
        for name in SFT_METRICS + (PER_MICRO_BATCH if grad_accum == 1 else ()):
            assert ours[name] == pytest.approx(theirs[name], abs=1e-4), f"step {step} {name}"
    start, theirs_end = base.state_dict(), theirs_model.state_dict()
    moved = 0.0
    for name, ours_end in ours_model.state_dict().items():
        torch.testing.assert_close(
            ours_end, theirs_end[name], rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved = max(moved, (ours_end - start[name]).abs().max().item())
    assert moved > 1e-3
