"""QLoRA against TRL: the same tiny Llama, quantized by the same bitsandbytes config (NF4, double
quantization, float32 compute), the same LoRA config and initial adapters, trained a few DPO steps
by preftune and by TRL's DPOTrainer (reference: the base with adapters off, in both)."""

import copy

import pytest
import torch
from datasets import Dataset
from helpers import TRL_METRICS, quiet_config
from test_trl_e2e import RECORDS

from preftune.experiments.synthetic import tiny_llama
from preftune.recipes.dpo import train

trl = pytest.importorskip("trl")
pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def seeded_adapters(monkeypatch):
    """Both trainers create their adapters with ``peft.get_peft_model``; seeding it makes their random
    A matrices equal whatever each consumed of the random stream before. Returns the fp32 adapters
    as created, by name."""
    created: dict[str, torch.Tensor] = {}
    original = peft.get_peft_model

    def get_peft_model(model, config, *args, **kwargs):
        torch.manual_seed(0)
        wrapped = original(model, config, *args, **kwargs)
        created.update({n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad})
        return wrapped

    monkeypatch.setattr(peft, "get_peft_model", get_peft_model)
    monkeypatch.setattr(trl.trainer.dpo_trainer, "get_peft_model", get_peft_model)
    return created


def trl_history(tmp_path, folder, tokenizer, created, keep_bf16_adapters=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, dtype=torch.float32
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(RECORDS),
        max_steps=5,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        beta=0.1,
        max_length=128,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(RECORDS),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**LORA),
    )
    if not keep_bf16_adapters:
        # TRL 1.16 casts a quantized model's adapters to bfloat16 (the QLoRA paper's GPU recipe);
        # preftune trains them in float32. Put TRL's back to the float32 values they were created with.
        for name, parameter in trainer.model.named_parameters():
            if parameter.requires_grad:
                parameter.data = created[name].clone()
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def preftune_history(tmp_path, folder, tokenizer):
    cfg = quiet_config(
        str(tmp_path / "preftune"),
        f"model.name_or_path={folder}",
        "model.load_in_4bit=true",
        f"model.lora_r={LORA['r']}",
        f"model.lora_alpha={LORA['lora_alpha']}",
        "train.max_steps=5",
        f"train.batch_size={len(RECORDS)}",
        "data.max_length=128",
    )
    return train(cfg, tokenizer=tokenizer, train_data=RECORDS).history


def test_five_qlora_steps_match_trl_dpo_trainer_on_the_same_nf4_base(tmp_path, tokenizer, monkeypatch):
    folder = tmp_path / "base"
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    created = seeded_adapters(monkeypatch)
    expected = trl_history(tmp_path, folder, copy.deepcopy(tokenizer), created)
    got = preftune_history(tmp_path, folder, tokenizer)

    assert len(got) == len(expected) == 5
    for step, (ours, theirs) in enumerate(zip(got, expected, strict=True), start=1):
        for name in TRL_METRICS:
            assert ours[name] == pytest.approx(theirs[name], abs=1e-4), f"step {step} {name}"
    assert got[-1]["loss"] < got[0]["loss"]  # it trained: the comparison is not between two idle runs
