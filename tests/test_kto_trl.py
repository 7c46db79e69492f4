"""End-to-end conformance: the same tiny Llama, records and hyperparameters in preftune's KTO
recipe and in TRL's own KTOTrainer give the same per-step losses, KL estimates, rewards, log-probs,
gradient norms and learning rates over 5 optimizer steps (fp32, no dropout, AdamW, linear schedule).

Both sides visit the examples in order (TRL samples sequentially for KTO; preftune with
``train.shuffle=false``), so every micro-batch holds the same examples and builds the same KL rows,
and each run stays within one epoch.
"""

import copy

import pytest
from datasets import Dataset
from helpers import quiet_config, sentiment_records, unpaired_records

from preftune.experiments.synthetic import tiny_llama
from preftune.recipes.dpo import train

trl = pytest.importorskip("trl")

STEPS, BATCH_SIZE = 5, 2
STEP_METRICS = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
    "num_tokens",
)
# TRL averages these per micro-batch; preftune takes token means over the step. They agree when a
# step is one micro-batch, and are compared there.
PER_MICRO_BATCH = ("entropy", "logits/chosen", "logits/rejected")

CASES = {
    # 10 unpaired records, labels alternating: every micro-batch holds both kinds. (With these
    # records the KL estimate is positive at steps 2 and 3, clamped to 0 at the others.)
    "kto-unpaired": ("kto", unpaired_records(STEPS * BATCH_SIZE, seed=5), 1, 1.33),
    # 10 pairs unpaired into 20 examples (10 desirable, then 10 undesirable), 2 micro-batches a step.
    # Each micro-batch holds one kind, so TRL's per-micro-batch means of rewards/* equal the step's.
    "kto-pairs-accumulating": ("kto", sentiment_records(STEPS * BATCH_SIZE, seed=2), 2, 1.33),
    "apo-zero-unpaired": ("apo_zero_unpaired", unpaired_records(STEPS * BATCH_SIZE, seed=1), 1, 1.0),
}


@pytest.mark.parametrize(
    ("loss_type", "records", "grad_accum", "undesirable_weight"), CASES.values(), ids=CASES
)
def test_five_steps_match_trl_kto_trainer(
    tmp_path, tokenizer, loss_type, records, grad_accum, undesirable_weight
):
    base = tiny_llama(len(tokenizer), seed=3)
    args = trl.KTOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        loss_type=loss_type,
        beta=0.1,
        undesirable_weight=undesirable_weight,
        max_length=128,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    reference = trl.KTOTrainer(
        model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )
    reference.train()
    expected = [h for h in reference.state.log_history if "loss" in h]

    cfg = quiet_config(
        str(tmp_path / "preftune"),
        f"objective.loss={loss_type}",
        f"objective.undesirable_weight={undesirable_weight}",
        f"train.batch_size={BATCH_SIZE}",
        f"train.grad_accum={grad_accum}",
        f"train.max_steps={STEPS}",
        "train.shuffle=false",
        "data.max_length=128",
    )
    got = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer, train_data=records).history

    assert len(got) == len(expected) == STEPS
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True), start=1):
        for name in STEP_METRICS + (PER_MICRO_BATCH if grad_accum == 1 else ()):
            if name in theirs:
                assert ours[name] == pytest.approx(theirs[name], abs=1e-4), f"step {step} {name}"
            elif name != "rewards/margins":  # a step without one kind of example logs no rewards for it
                assert name not in ours, f"step {step} {name}"
            # TRL logs a margin only from a micro-batch holding both kinds; preftune from the step.
    # It trained: the policy left the reference, so the comparison is not between two idle runs.
    assert max(abs(row["rewards/chosen"]) for row in got if "rewards/chosen" in row) > 1e-2
    if loss_type == "kto":
        assert max(row["kl"] for row in got) > 0
