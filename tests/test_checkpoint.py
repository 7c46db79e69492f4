"""Checkpoints round-trip every kind of model they meet, and fail with a message, not a trace."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from preftune.engine.checkpoint import (
    CheckpointContents,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    save_final,
)
from preftune.experiments.synthetic import tiny_llama
from preftune.model.load import is_peft


def _optimizer(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _save(tmp_path, model, tokenizer, state=None, **kwargs):
    contents = CheckpointContents(model, tokenizer, *_optimizer(model), state or {}, **kwargs)
    return save_checkpoint(tmp_path, 1, contents)


def _tiny_moe_config(tokenizer):
    return Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def _roundtrip(tmp_path, model, fresh, tokenizer):
    path = _save(tmp_path, model, tokenizer, {"examples_seen": 4})
    state = load_checkpoint(path, fresh, *_optimizer(fresh))
    assert state == {"examples_seen": 4, "step": 1}
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


def test_a_mixture_of_experts_model_round_trips_although_its_hub_layout_differs(tmp_path, tokenizer):
    config = _tiny_moe_config(tokenizer)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(config)
    torch.manual_seed(1)
    _roundtrip(tmp_path, model, Qwen2MoeForCausalLM(config), tokenizer)


def test_a_model_with_tied_embeddings_round_trips(tmp_path, tokenizer):
    model, fresh = tiny_llama(len(tokenizer), seed=1), tiny_llama(len(tokenizer), seed=2)
    for m in (model, fresh):
        m.config.tie_word_embeddings = True
        m.tie_weights()
    _roundtrip(tmp_path, model, fresh, tokenizer)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_a_corrupt_checkpoint_fails_with_a_message_naming_it(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    path = _save(tmp_path, model, tokenizer)
    (path / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint-1: cannot resume from this checkpoint"):
        load_checkpoint(path, model, *_optimizer(model))


def test_a_deepspeed_checkpoint_resumed_without_deepspeed_says_which_launch_it_needs(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    partitions = tmp_path / ".tmp-optimizer"
    partitions.mkdir()  # what every DeepSpeed process wrote its optimizer file into
    path = _save(tmp_path, model, tokenizer, optimizer_state=partitions)
    assert (path / "optimizer").is_dir() and not (path / "optimizer.pt").exists()
    with pytest.raises(CheckpointError, match="written by DeepSpeed"):
        load_checkpoint(path, model, *_optimizer(model))


def test_final_lora_folder_has_merged_weights_and_the_live_model_keeps_its_adapters(tmp_path, tokenizer):
    base = tiny_llama(len(tokenizer), seed=3)
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    final = save_final(tmp_path, peft_model, tokenizer)
    assert is_peft(peft_model) and peft_model.peft_config  # still a PEFT model, adapters intact
    loaded = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, base(ids).logits)


def test_resuming_lora_with_other_adapter_layers_is_refused(tmp_path, tokenizer):
    saved = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    path = _save(tmp_path, saved, tokenizer)
    other = get_peft_model(
        tiny_llama(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    with pytest.raises(CheckpointError, match="adapter does not fit this model's LoRA layers"):
        load_checkpoint(path, other, *_optimizer(other))


def test_a_converted_checkpoint_missing_weights_is_refused_not_filled_at_random(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    config = _tiny_moe_config(tokenizer)
    model = Qwen2MoeForCausalLM(config)
    path = _save(tmp_path, model, tokenizer)
    weights = load_file(str(path / "model.safetensors"))
    del weights[next(k for k in weights if "q_proj" in k)]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="weights do not match the model"):
        load_checkpoint(path, Qwen2MoeForCausalLM(config), *_optimizer(model))
