"""rollout.engine: vllm. Where vLLM and a CUDA GPU are present, both engines must give the same
greedy completions and vLLM must sample from the policy's current weights; everywhere, a run
asking for vLLM where it cannot run stops with one message naming the key, and vLLM's outputs
are read back as the transformers engine gives them."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from preftune.config import load_config
from preftune.config.rl import RolloutConfig
from preftune.errors import ConfigError
from preftune.experiments.synthetic import tiny_llama
from preftune.generation.rollout import Completion, TransformersRollout
from preftune.generation.vllm_engine import _completion, rollout_factory

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ON_GPU_WITH_VLLM = HAS_VLLM and torch.cuda.is_available()
GREEDY = RolloutConfig(max_new_tokens=8, temperature=0.0, batch_size=8)


@pytest.mark.skipif(ON_GPU_WITH_VLLM, reason="vLLM can run here")
def test_asking_for_vllm_where_it_cannot_run_names_the_key_and_the_way_out():
    with pytest.raises(ConfigError, match=r"rollout\.engine: vllm (is not installed|needs a CUDA GPU)"):
        rollout_factory(RolloutConfig(engine="vllm"), "some/model", pad_token_id=0, stop_ids=[2])


@pytest.mark.skipif(ON_GPU_WITH_VLLM, reason="vLLM can run here")
def test_the_online_command_with_vllm_where_it_cannot_run_stops_before_training(tmp_path, tokenizer, capsys):
    from preftune.cli import main

    tiny_llama(len(tokenizer), seed=1).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "review of the park:"}) + "\n")
    (tmp_path / "rewards.py").write_text(
        "def words(prompts, completions):\n    return [1.0 for c in completions]\n"
    )
    argv = ["online", "--model", str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.jsonl"),
            "--reward", f"{tmp_path / 'rewards.py'}:words", "--output", str(tmp_path / "out"),
            "--set", "rollout.engine=vllm", "--set", "train.report_to=none"]  # fmt: skip
    assert main(argv) == 2
    assert "rollout.engine: vllm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_engine_and_its_memory_share_are_checked_at_the_edge():
    with pytest.raises(ConfigError, match=r"rollout\.engine: 'sglang' is not one of"):
        load_config(overrides=["rollout.engine=sglang"])
    with pytest.raises(ConfigError, match=r"rollout.vllm_gpu_memory_utilization: must be in \(0, 1\]"):
        load_config(overrides=["rollout.vllm_gpu_memory_utilization=1.5"])


def _output(token_ids, finish_reason, stop_reason=None):
    return SimpleNamespace(token_ids=token_ids, finish_reason=finish_reason, stop_reason=stop_reason)


def test_a_vllm_completion_reads_back_up_to_and_including_its_stop_token():
    assert _completion(_output([5, 6, 2], "stop"), {2}) == Completion([5, 6, 2], True)
    assert _completion(_output([5, 6, 7], "length"), {2}) == Completion([5, 6, 7], False)
    # A stop token vLLM left out of the ids is put back: training reads the EOS as generated.
    assert _completion(_output([5, 6], "stop", stop_reason=3), {2, 3}) == Completion([5, 6, 3], True)


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return model.cuda(), str(tmp_path / "base")


@pytest.mark.skipif(not ON_GPU_WITH_VLLM, reason="needs vLLM and a CUDA GPU")
def test_vllm_and_transformers_give_the_same_greedy_completions(saved_model, tokenizer):
    model, path = saved_model
    prompts = [tokenizer(text)["input_ids"] for text in ("review of the park:", "a", "the long trip:")]
    stop = [tokenizer.eos_token_id]
    on_vllm = rollout_factory(GREEDY, path, tokenizer.pad_token_id, stop)(model)
    on_transformers = TransformersRollout(model, tokenizer.pad_token_id, stop)
    assert on_vllm.generate(prompts, GREEDY, seed=0) == on_transformers.generate(prompts, GREEDY, seed=0)


@pytest.mark.skipif(not ON_GPU_WITH_VLLM, reason="needs vLLM and a CUDA GPU")
def test_vllm_samples_from_the_policys_current_weights(saved_model, tokenizer):
    model, path = saved_model
    prompts = [tokenizer(text)["input_ids"] for text in ("review of the park:", "the long trip:")]
    stop = [tokenizer.eos_token_id]
    on_vllm = rollout_factory(GREEDY, path, tokenizer.pad_token_id, stop)(model)
    before = on_vllm.generate(prompts, GREEDY, seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    after = on_vllm.generate(prompts, GREEDY, seed=0)
    assert after == TransformersRollout(model, tokenizer.pad_token_id, stop).generate(prompts, GREEDY, seed=0)
    assert after != before
