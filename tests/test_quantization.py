"""bitsandbytes on a CPU: QLoRA (an NF4 base with LoRA on top) in every recipe that trains LoRA, a
quantized live reference, 8-bit optimizer states, and the settings refused before any model loads.

Tolerances measured here (CPU, float32 compute, tiny random Llamas; the bench measures a trained model):
a quantized reference's summed completion log-probs (about 14 tokens a sequence) move by at most
0.014 nats in int8 and 0.22 in NF4 over three seeds; the tests allow 0.03 and 0.3.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from helpers import quiet_config, sentiment_records, unpaired_records

from preftune.config import DataConfig, ModelConfig, load_config
from preftune.data import prepare_pairs
from preftune.data.layouts import collate_pairs
from preftune.engine.bnb import check_bitsandbytes
from preftune.errors import ConfigError
from preftune.experiments.synthetic import tiny_llama
from preftune.model.load import _load_kwargs, prepare_for_training
from preftune.model.quantize import is_quantized, quantized
from preftune.model.reference import ModelReference, Placement, build_reference, reference_model
from preftune.recipes.dpo import train

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

RECORDS = sentiment_records(32, seed=1)
CPU = torch.device("cpu")


def qlora_config(output, *overrides):
    return quiet_config(
        str(output),
        "model.load_in_4bit=true",
        "model.lora_r=8",
        "train.batch_size=8",
        "train.learning_rate=5e-3",
        *overrides,
    )


def losses(result):
    return [h["loss"] for h in result.history if "loss" in h]


# --------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_loads_an_nf4_base_with_double_quantization_computing_in_model_dtype(dtype):
    quantization = _load_kwargs(ModelConfig(load_in_4bit=True, dtype=dtype))["quantization_config"]
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == getattr(torch, dtype)  # not a fixed bfloat16


def test_a_model_object_given_with_load_in_4bit_is_trained_as_lora_on_its_nf4_quantized_weights(tokenizer):
    plain = tiny_llama(len(tokenizer), seed=3)
    model = prepare_for_training(plain, ModelConfig(load_in_4bit=True, lora_r=4))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    assert layer.base_layer.weight.quant_state.nested  # double quantization
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not is_quantized(plain)  # the object given stays as it was


def test_a_qlora_dpo_run_lowers_the_loss_on_the_synthetic_task(tmp_path, tokenizer):
    result = train(
        qlora_config(tmp_path, "train.max_steps=12"),
        model=tiny_llama(len(tokenizer), seed=3),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    values = losses(result)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.03
    assert result.history[-1]["rewards/accuracies"] > 0.5


def test_an_interrupted_qlora_run_resumes_to_the_uninterrupted_losses(tmp_path, tokenizer):
    def run(folder, *overrides, stop_after=None):
        config = qlora_config(tmp_path / folder, "train.max_steps=6", "train.save_every=3", *overrides)
        model = tiny_llama(len(tokenizer), seed=3)
        return train(config, model=model, tokenizer=tokenizer, train_data=RECORDS, stop_after=stop_after)

    straight = losses(run("a"))
    assert run("b", stop_after=3).final_dir is None
    resumed = losses(run("b", "train.resume=true"))
    assert resumed == straight[3:]  # bit for bit


def test_the_qlora_final_folder_is_the_nf4_base_plus_its_adapter_merged_as_a_plain_model(tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "base"
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    config = qlora_config(tmp_path / "run", f"model.name_or_path={folder}", "train.max_steps=4")
    final = train(config, tokenizer=tokenizer, train_data=RECORDS).final_dir
    assert final is not None

    merged = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no quantization settings
    assert not is_quantized(merged) and merged.dtype == torch.float32
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    from preftune.model.load import load_model

    trained = PeftModel.from_pretrained(load_model(config.model), final / "adapter")  # NF4 base + adapter
    ids = torch.tensor([tokenizer("review of the park: great calm")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, atol=1e-5, rtol=0)
        # The adapter trained: the merged model is not just the dequantized base.
        with trained.disable_adapter():
            assert (merged(ids).logits - trained(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("recipe", ["sft", "kto", "reward"])
def test_qlora_trains_sft_kto_and_reward_models_and_saves_plain_merged_weights(tmp_path, tokenizer, recipe):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from preftune.experiments.synthetic import tiny_reward_model
    from preftune.recipes.reward import train_reward_model
    from preftune.recipes.sft import train_sft

    runs = {
        "sft": (
            train_sft,
            tiny_llama,
            [{"prompt": r["prompt"], "completion": r["chosen"]} for r in RECORDS],
            (),
        ),
        "kto": (train, tiny_llama, unpaired_records(32, seed=1), ("objective.loss=kto",)),
        "reward": (train_reward_model, tiny_reward_model, RECORDS, ()),
    }
    fit, build, records, extra = runs[recipe]
    config = qlora_config(tmp_path, "train.max_steps=3", *extra)
    result = fit(config, model=build(len(tokenizer), seed=3), tokenizer=tokenizer, train_data=records)
    assert all(torch.isfinite(torch.tensor(losses(result))))
    loader = AutoModelForSequenceClassification if recipe == "reward" else AutoModelForCausalLM
    assert not is_quantized(loader.from_pretrained(result.final_dir))
    assert (result.final_dir / "adapter" / "adapter_model.safetensors").exists()


def test_qlora_online_dpo_trains_each_round_on_an_nf4_base_and_saves_plain_weights(tmp_path, tokenizer):
    from test_online import run_online
    from transformers import AutoModelForCausalLM

    result = run_online(
        tmp_path, tokenizer, "model.load_in_4bit=true", "model.lora_r=4", "online.final_samples=false"
    )
    assert len(result.rounds) == 2
    log = (tmp_path / "online" / "round-02" / "train" / "metrics.jsonl").read_text()
    assert json.loads(log.splitlines()[0])["rewards/chosen"] == 0.0  # adapters off = the round's start
    assert not is_quantized(AutoModelForCausalLM.from_pretrained(result.final_dir))


def test_qlora_ppo_trains_against_the_nf4_base_with_adapters_off(tmp_path, tokenizer):
    from test_ppo import run_ppo

    result = run_ppo(
        tmp_path,
        tokenizer,
        "model.load_in_4bit=true",
        "model.lora_r=4",
        "train.learning_rate=1e-2",
        "ppo.steps=2",
    )
    first, second = result.history
    assert first["objective/kl"] == 0.0 and second["objective/kl"] != 0.0
    assert (tmp_path / "ppo" / "final" / "model.safetensors").exists()


# --------------------------------------------------------------------------- the quantized reference


@pytest.mark.parametrize(("kind", "tolerance"), [("int8", 0.03), ("nf4", 0.3)])
def test_a_quantized_reference_scores_within_the_stated_tolerance_of_the_fp32_one(tokenizer, kind, tolerance):
    pairs = prepare_pairs(
        sentiment_records(16, seed=2), tokenizer, DataConfig(max_length=128), progress=False
    )[0]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    model = tiny_llama(len(tokenizer), seed=1)
    exact = ModelReference(model).logps(batch)
    rounded = ModelReference(quantized(model, kind, torch.float32, CPU)).logps(batch)
    error = (rounded - exact).abs()
    assert error.max() < tolerance
    assert error.max() > 0  # it is quantized: the rounding shows


@pytest.mark.parametrize(("kind", "share"), [("int8", 0.6), ("nf4", 0.5)])
def test_reference_quantize_holds_a_quantized_frozen_copy_and_leaves_the_policy_as_it_is(
    tokenizer, kind, share
):
    policy = tiny_llama(len(tokenizer), seed=1)
    config = load_config(overrides=[f"reference.quantize={kind}"])
    reference, strategy = build_reference(config, True, policy, None, [], tokenizer.pad_token_id, Placement())
    assert strategy == "copy" and is_quantized(reference.model) and not is_quantized(policy)
    # Embeddings and the output head stay float32 (transformers quantizes the decoder's linears).
    assert reference.model.get_memory_footprint() < share * policy.get_memory_footprint()


def test_a_dpo_run_against_an_nf4_reference_starts_from_the_quantization_gap(tmp_path, tokenizer):
    # Before the first update the policy is the starting model: against an exact copy every reward
    # is 0; against its NF4 copy the rewards are β times the rounding of the reference's log-probs.
    def first(kind):
        config = quiet_config(str(tmp_path / kind), "train.max_steps=1", f"reference.quantize={kind}")
        result = train(
            config, model=tiny_llama(len(tokenizer), seed=1), tokenizer=tokenizer, train_data=RECORDS
        )
        return result.history[0]

    assert first("none")["rewards/chosen"] == 0.0
    assert 0 < abs(first("nf4")["rewards/chosen"]) < 0.1 * 0.3


def test_a_reference_path_is_loaded_quantized(tmp_path, tokenizer):
    tiny_llama(len(tokenizer), seed=5).save_pretrained(tmp_path / "ref")
    config = load_config(overrides=[f"reference.path={tmp_path / 'ref'}", "reference.quantize=int8"])
    policy = tiny_llama(len(tokenizer), seed=1)
    reference, _ = build_reference(config, True, policy, None, [], tokenizer.pad_token_id, Placement())
    assert is_quantized(reference.model)


def test_ppos_live_reference_is_quantized_as_reference_quantize_says(tokenizer):
    policy = tiny_llama(len(tokenizer), seed=1)
    assert is_quantized(reference_model(load_config(overrides=["reference.quantize=nf4"]), policy))
    assert not is_quantized(reference_model(load_config(), policy))


class Stop(Exception):
    pass


def test_online_dpo_keeps_its_initial_model_quantized_as_its_reference(tmp_path, tokenizer, monkeypatch):
    from test_online import run_online

    import preftune.recipes.online as online

    seen = []

    def first_round(
        config, **kwargs
    ):  # what round 1 trains against; the rounds themselves are tested elsewhere
        seen.append(kwargs["reference_model"])
        raise Stop

    monkeypatch.setattr(online, "train", first_round)
    with pytest.raises(Stop):
        run_online(tmp_path, tokenizer, "reference.quantize=int8", "online.reference=initial")
    assert is_quantized(seen[0])


# --------------------------------------------------------------------------- 8-bit optimizer states


def test_adamw_8bit_keeps_8bit_moments_and_a_resumed_run_repeats_the_uninterrupted_losses(
    tmp_path, tokenizer
):
    def run(folder, *overrides, stop_after=None):
        config = quiet_config(
            str(tmp_path / folder),
            "train.optimizer=adamw_8bit",
            "train.max_steps=6",
            "train.save_every=3",
            "train.batch_size=8",
            *overrides,
        )
        model = tiny_llama(len(tokenizer), seed=3)
        return train(config, model=model, tokenizer=tokenizer, train_data=RECORDS, stop_after=stop_after)

    straight = losses(run("a"))
    run("b", stop_after=3)
    state = torch.load(tmp_path / "b" / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    moments = [
        value for entry in state.values() for key, value in _flat(entry) if key in ("state1", "state2")
    ]
    assert any(m.dtype == torch.uint8 for m in moments)  # 8-bit states, not 32-bit ones
    assert losses(run("b", "train.resume=true")) == straight[3:]
    assert straight[-1] < straight[0]


def _flat(entry):
    for key, value in entry.items():
        yield from _flat(value) if isinstance(value, dict) else [(key, value)]


def test_paged_adamw_8bit_on_a_cpu_says_it_runs_as_adamw_8bit(capsys):
    from accelerate import Accelerator

    check_bitsandbytes(
        load_config(overrides=["train.optimizer=paged_adamw_8bit"]), Accelerator(cpu=True), print
    )
    assert "runs as adamw_8bit" in capsys.readouterr().out


def test_an_8bit_optimizer_this_device_cannot_run_is_refused_naming_it(monkeypatch):
    # No device here lacks bitsandbytes' kernels: the step raises as bitsandbytes does for one.
    def no_kernel(self, *args, **kwargs):
        raise NotImplementedError("No kernel for optimizer_update_8bit_blockwise on device 'cpu'")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", no_kernel)
    from accelerate import Accelerator

    with pytest.raises(
        ConfigError, match=r"train.optimizer: adamw_8bit does not run on cpu .*No kernel.*use adamw"
    ):
        check_bitsandbytes(
            load_config(overrides=["train.optimizer=adamw_8bit"]), Accelerator(cpu=True), print
        )


# --------------------------------------------------------------------------- refusals before any model loads


MISSING_MODEL = "model.name_or_path=/nonexistent/model"  # any load would fail on this instead


@pytest.mark.parametrize(
    "setting", ["model.load_in_4bit=true", "reference.quantize=int8", "train.optimizer=adamw_8bit"]
)
def test_a_missing_bitsandbytes_is_one_line_naming_the_extra(tmp_path, tokenizer, monkeypatch, setting):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    config = quiet_config(str(tmp_path), MISSING_MODEL, setting)
    with pytest.raises(ConfigError) as caught:
        train(config, tokenizer=tokenizer, train_data=RECORDS)
    assert str(caught.value) == f"{setting.split('=')[0]}: needs bitsandbytes (pip install 'preftune[quant]')"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["reference.strategy=adapter", "model.lora=true"], "'adapter' holds no reference model"),
        (["reference.strategy=precomputed"], "'precomputed' holds no reference model"),
        (["reference.strategy=none"], "'none' holds no reference model"),
        (["model.lora=true"], "with LoRA the reference is the policy's own base"),
        (["model.load_in_4bit=true"], "with LoRA the reference is the policy's own base"),
    ],
)
def test_reference_quantize_without_a_live_frozen_reference_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["reference.quantize=nf4", *overrides])


def test_reference_quantize_with_lora_and_a_reference_path_is_accepted():
    load_config(overrides=["reference.quantize=nf4", "model.lora=true", "reference.path=/some/model"])


def test_reference_quantize_on_a_reference_free_objective_is_refused_before_any_model_loads(
    tmp_path, tokenizer
):
    config = quiet_config(str(tmp_path), MISSING_MODEL, "reference.quantize=int8", "objective.loss=simpo")
    with pytest.raises(ConfigError, match="objective 'simpo' is reference-free"):
        train(config, tokenizer=tokenizer, train_data=RECORDS)


def test_online_dpo_refuses_reference_quantize_on_a_reference_free_objective_before_loading(
    tmp_path, tokenizer
):
    from test_online import sentiment_prompts

    from preftune.recipes.online import train_online

    config = quiet_config(str(tmp_path), MISSING_MODEL, "reference.quantize=int8", "objective.loss=simpo")
    with pytest.raises(ConfigError, match="reference-free"):
        train_online(
            config, tokenizer=tokenizer, prompts=sentiment_prompts(), scorer=lambda p, c: [0.0] * len(c)
        )


def sharded(kind):
    """An accelerator as FSDP2 or DeepSpeed ZeRO-2 launches leave it."""
    plugin = SimpleNamespace(zero_stage=2)
    return SimpleNamespace(distributed_type=kind, device=CPU, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("launch", [DistributedType.FSDP, DistributedType.DEEPSPEED])
@pytest.mark.parametrize(
    "setting", ["model.load_in_4bit=true", "reference.quantize=int8", "train.optimizer=adamw_8bit"]
)
def test_bitsandbytes_settings_are_refused_under_fsdp2_and_deepspeed(launch, setting):
    name = "DeepSpeed" if launch == DistributedType.DEEPSPEED else "FSDP2"
    with pytest.raises(ConfigError, match=rf"{setting.split('=')[0]}: .* cannot be sharded under {name}"):
        check_bitsandbytes(load_config(overrides=[setting]), sharded(launch), print)
