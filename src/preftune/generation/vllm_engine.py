"""The choice of rollout engine (``rollout.engine``), and rollouts on vLLM (a CUDA GPU and
``pip install vllm``): the :class:`~preftune.generation.rollout.Rollout` interface again, so online DPO and
PPO sample on vLLM by setting ``rollout.engine: vllm``.

One ``vllm.LLM`` lives in the training process, on the training GPU (colocated), built once from
the starting model's folder or hub name. Before every ``generate`` the current policy's weights
are copied into it, so it samples from exactly the model being trained: once per round in online
DPO, once per step in PPO. With ``rollout.vllm_sleep`` the engine releases its GPU memory between
rollouts (its weights are copied in again on waking, so nothing stale survives a sleep).

Written against the in-process engine of vLLM 0.22–0.31 (the versions TRL 1.16 supports), with
the same model-runner entry point TRL uses to load weights. vLLM samples with its own random
generator: under the same seed the completions are reproducible run to run, but they are not the
transformers engine's samples. Under greedy decoding both give the same completions, up to the
numerical differences of their kernels (``tests/test_rollout_vllm.py``, where a GPU is present).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..config.rl import RolloutConfig
from ..errors import ConfigError
from .rollout import Completion, Rollout, TransformersRollout, cut_at_stop


def check_vllm_available() -> None:
    """Refuse ``rollout.engine: vllm`` where it cannot run, before any model is loaded."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout.engine: vllm is not installed (pip install vllm; it needs a CUDA GPU)")
    if not torch.cuda.is_available():
        raise ConfigError("rollout.engine: vllm needs a CUDA GPU, and none is visible; use transformers")


def _in_process_defaults() -> None:
    """vLLM's in-process ("external launcher") engine reads the torch.distributed variables; a
    plain single-process run has none, so give it a group of one."""
    for name, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


class VLLMEngine:
    """One ``vllm.LLM`` for the whole run; :meth:`rollout_for` binds it to a policy."""

    def __init__(
        self,
        model_name: str,
        params: RolloutConfig,
        dtype: torch.dtype,
        max_model_len: int | None = None,
        progress: bool = False,
    ):
        check_vllm_available()
        from vllm import LLM

        _in_process_defaults()
        self.sleep = params.vllm_sleep
        self.progress = progress
        self.llm = LLM(
            model=model_name,
            dtype=str(dtype).removeprefix("torch."),
            gpu_memory_utilization=params.vllm_gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=self.sleep,
            distributed_executor_backend="external_launcher",  # in this process: weights can be copied in
            seed=0,
        )
        if self.sleep:
            self.llm.sleep(level=2)  # level 2 drops the weights: they are copied in before every rollout

    def rollout_for(self, policy: nn.Module, stop_ids: Sequence[int]) -> VLLMRollout:
        from ..model.load import is_peft

        if is_peft(policy):
            raise ConfigError(
                "rollout.engine: vllm with a LoRA policy is not supported yet (the adapters would need "
                "merging before each copy); use rollout.engine: transformers"
            )
        return VLLMRollout(self, policy, stop_ids)

    def load_weights(self, policy: nn.Module) -> None:
        """Copy the policy's current weights into the engine, one tensor at a time."""
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in _named_weights(policy):
            runner.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt states belong to the old weights


def _named_weights(policy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The transformers model's weights under the names its checkpoint uses (vLLM maps those)."""
    for name, tensor in policy.state_dict().items():
        yield name, tensor.detach()


class VLLMRollout:
    """Samples from ``policy`` on the engine: its weights are copied in first, every call."""

    def __init__(self, engine: VLLMEngine, policy: nn.Module, stop_ids: Sequence[int]):
        self.engine = engine
        self.policy = policy
        self.stop_ids = list(stop_ids)

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: RolloutConfig, seed: int, desc: str = "sampling"
    ) -> list[Completion]:
        from vllm import SamplingParams

        engine = self.engine
        engine.load_weights(self.policy)
        if engine.sleep:
            engine.llm.wake_up(tags=["kv_cache"])
        # A seed per request: a prompt asked K times (K samples) must not get K equal completions.
        sampling = [
            SamplingParams(
                n=1,
                temperature=params.temperature,
                top_k=params.top_k if params.top_k > 0 else -1,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=self.stop_ids,
                seed=seed * 1_000_003 + i,
            )
            for i in range(len(prompt_ids))
        ]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = engine.llm.generate(requests, sampling_params=sampling, use_tqdm=engine.progress)
        if engine.sleep:
            engine.llm.sleep(level=2)
        return [_completion(output.outputs[0], set(self.stop_ids)) for output in outputs]


def _completion(output: Any, stop: set[int]) -> Completion:
    """A vLLM completion as the transformers engine gives it: up to and including the stop token."""
    completion = cut_at_stop(list(output.token_ids), stop)
    if output.finish_reason == "stop" and not completion.ended:
        # Stopped by a stop token that vLLM left out of the ids: put it back, as training reads it.
        reason = output.stop_reason
        stop_token = int(reason) if isinstance(reason, int) else min(stop, default=None)
        completion = Completion([*completion.ids, *([] if stop_token is None else [stop_token])], True)
    return completion


def check_engine(params: RolloutConfig) -> None:
    """Refuse a ``rollout.engine`` that cannot run here, before a run loads or writes anything."""
    if params.engine == "vllm":
        check_vllm_available()


def rollout_factory(
    params: RolloutConfig, model_name: str, pad_token_id: int, stop_ids: Sequence[int], progress: bool = False
) -> Callable[[Any], Rollout]:
    """The run's sampler for a policy, per ``rollout.engine``: ``model.generate`` on the policy
    itself, or one vLLM engine for the whole run (built at the first call) that copies the
    policy's weights in before each rollout."""
    if params.engine == "transformers":
        return lambda policy: TransformersRollout(policy, pad_token_id, stop_ids, progress)
    check_engine(params)
    if not model_name:
        raise ConfigError("rollout.engine: vllm builds its engine from model.name_or_path, which is empty")
    engines: list[VLLMEngine] = []

    def on_vllm(policy: Any) -> Rollout:
        if not engines:
            engines.append(VLLMEngine(model_name, params, next(policy.parameters()).dtype, progress=progress))
        return engines[0].rollout_for(policy, stop_ids)

    return on_vllm
