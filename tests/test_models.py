"""Model preparation: nothing random may make the policy and the reference disagree."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.config import ModelConfig
from preftune.model.load import prepare_for_training


def test_every_dropout_is_zeroed_and_the_saved_config_keeps_its_rates():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_dropout=0.3,
    )
    model = prepare_for_training(LlamaForCausalLM(config), ModelConfig())
    assert model.config.attention_dropout == 0.3  # what save_pretrained writes stays the published value
    rates = [
        v for m in model.modules() for k, v in vars(m).items() if "dropout" in k and isinstance(v, float)
    ]
    assert rates and all(rate == 0.0 for rate in rates)


def test_a_tokenizer_without_pad_token_pads_with_eos(tokenizer):
    import copy

    from preftune.model.load import prepare_tokenizer

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    prepared = prepare_tokenizer(no_pad, ModelConfig())
    assert prepared.pad_token == prepared.eos_token == "</s>"


def test_gradient_checkpointing_is_switched_on_in_the_decoder(tokenizer):
    from preftune.experiments.synthetic import tiny_llama

    model = prepare_for_training(tiny_llama(len(tokenizer)), ModelConfig(gradient_checkpointing=True))
    assert model.model.gradient_checkpointing is True


def test_an_uncached_hub_name_with_no_network_fails_at_once_in_one_line(monkeypatch):
    """No real connection is made: the cache lookup and the connection attempt are stubbed."""
    import huggingface_hub

    import preftune.model.load as models
    from preftune.errors import ModelLoadError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    attempts = []

    def unreachable(address, timeout):
        attempts.append(timeout)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(models.socket, "create_connection", unreachable)
    with pytest.raises(ModelLoadError) as info:
        models.load_tokenizer(ModelConfig(name_or_path="some-org/some-model"))
    message = str(info.value)
    assert message.startswith("model.name_or_path: 'some-org/some-model' is not in the local cache")
    assert "Network is unreachable" in message and "\n" not in message
    assert attempts == [3]


def test_a_local_folder_never_asks_the_hub(tmp_path, monkeypatch):
    import preftune.model.load as models
    from preftune.experiments.synthetic import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(models.socket, "create_connection", lambda *a, **k: pytest.fail("asked the hub"))
    assert models.load_tokenizer(ModelConfig(name_or_path=str(tmp_path))).eos_token == "</s>"
