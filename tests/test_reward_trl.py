"""End-to-end conformance: the same tiny Llama reward model, records and hyperparameters in
preftune's Bradley–Terry recipe and in TRL's own RewardTrainer give the same per-step losses,
accuracies, margins, rewards and gradient norms."""

import copy

import pytest
import torch
from datasets import Dataset
from helpers import quiet_config, sentiment_records
from transformers import LlamaConfig, LlamaForSequenceClassification, TrainerCallback

from preftune.recipes.reward import train_reward_model

trl = pytest.importorskip("trl")

STEPS, BATCH_SIZE = 5, 2
# One epoch of ten pairs: both sides shuffle with randperm(n, Generator().manual_seed(seed)),
# so with the same seed each step sees the same two pairs.
RECORDS = sentiment_records(STEPS * BATCH_SIZE, seed=5)
MARGINS = [0.25 * (i % 4) for i in range(len(RECORDS))]
# What TRL's RewardTrainer logs every step, and what preftune must log under the same names.
RM_METRICS = (
    "loss",
    "accuracy",
    "margin",
    "min_reward",
    "mean_reward",
    "max_reward",
    "grad_norm",
    "learning_rate",
)


def tiny_reward_model(tokenizer, seed: int) -> LlamaForSequenceClassification:
    """A randomly initialised two-layer Llama with a one-output score head (TRL requires num_labels=1)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


class _Collect(TrainerCallback):
    """Keeps every training log row TRL emits (one per step with logging_steps=1)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, **logs})


@pytest.mark.parametrize(
    ("with_margin", "center"),
    [(False, None), (True, None), (False, 0.01)],
    ids=["plain", "margin-column", "centered"],
)
def test_five_steps_match_trl_reward_trainer(tmp_path, tokenizer, with_margin, center):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the score is read at the last non-pad token
    records = [{**r, "margin": m} if with_margin else dict(r) for r, m in zip(RECORDS, MARGINS, strict=True)]
    base = tiny_reward_model(tokenizer, seed=3)

    collect = _Collect()
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=BATCH_SIZE,
        max_steps=STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        center_rewards_coefficient=center,
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
    reference = trl.RewardTrainer(
        model=theirs_model,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[collect],
    )
    assert ("margin" in reference.train_dataset.column_names) == with_margin
    reference.train()
    expected = collect.rows

    overrides = [
        f"train.batch_size={BATCH_SIZE}",
        f"train.max_steps={STEPS}",
        "train.scheduler=constant",
        "train.seed=42",
        "data.max_length=null",
        # TRL's rows: the same computation, to rounding. A shared layout agrees to rounding on a
        # step (tests/test_layouts_reward.py), and five Adam steps at 1e-3 amplify that past 1e-4.
        "data.layout=padded",
    ]
    if center is not None:
        overrides.append(f"rm.center_rewards_coefficient={center}")
    cfg = quiet_config(str(tmp_path / "preftune"), *overrides)
    got = train_reward_model(cfg, model=ours_model, tokenizer=tokenizer, train_data=records).history

    assert len(got) == len(expected) == STEPS
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True), start=1):
        assert ours["step"] == theirs["step"] == step
        for name in RM_METRICS:
            assert ours[name] == pytest.approx(theirs[name], abs=1e-4), f"step {step} {name}"
        assert ours["num_tokens"] == theirs["num_tokens"], f"step {step} num_tokens"

    # Both trained the same weights, and they moved: the comparison is not between two idle runs.
    start, theirs_end = base.state_dict(), theirs_model.state_dict()
    moved = 0.0
    for name, ours_end in ours_model.state_dict().items():
        torch.testing.assert_close(
            ours_end, theirs_end[name], rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved = max(moved, (ours_end - start[name]).abs().max().item())
    assert moved > 1e-3
