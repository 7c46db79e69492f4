"""Small builders shared by the training tests."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

from preftune.config import ObjectiveConfig, RunConfig, load_config
from preftune.experiments.synthetic import SentimentTask
from preftune.losses import Objective, PairStats, build_objective

# What TRL's DPOTrainer logs every step, and what preftune must log under the same names.
TRL_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "learning_rate",
)
THROUGHPUT_METRICS = ("pairs_per_second", "tokens_per_second")

QUIET_FLAGS = [
    "--set",
    "train.report_to=none",
    "--set",
    "train.progress=false",
    "--set",
    "train.mixed_precision=no",
]
"""Command-line flags that keep a test run quiet and in fp32."""


def write_train_inputs(folder: Path, tokenizer: Any) -> Path:
    """``folder/model`` (a tiny Llama with ``tokenizer``) and ``folder/pairs.jsonl`` (16 pairs)."""
    from preftune.experiments.synthetic import tiny_llama

    tiny_llama(len(tokenizer), seed=0).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_records(16, seed=3)))
    return folder


def sentiment_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` standard records from the synthetic task, chosen by the true reward (ties skipped)."""
    task, rng = SentimentTask(), random.Random(seed)
    records: list[dict[str, str]] = []
    while len(records) < n:
        prompt = task.prompt(rng.choice(["park", "movie", "book", "song"]))
        a, b = task.random_response(rng), task.random_response(rng)
        if task.true_reward(a) == task.true_reward(b):
            continue
        chosen, rejected = (a, b) if task.true_reward(a) > task.true_reward(b) else (b, a)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def unpaired_records(n: int, seed: int = 0) -> list[dict[str, object]]:
    """``n`` unpaired (KTO) records from the synthetic task, labels alternating, desirable first."""
    records: list[dict[str, object]] = []
    for i, pair in enumerate(sentiment_records(n, seed=seed)):
        desirable = i % 2 == 0
        completion = pair["chosen"] if desirable else pair["rejected"]
        records.append({"prompt": pair["prompt"], "completion": completion, "label": desirable})
    return records


def quiet_config(output_dir: str, *overrides: str) -> RunConfig:
    """A fast CPU config: no progress bar, no trackers, no checkpoints unless asked, log every step, fp32."""
    return load_config(
        overrides=[
            f"train.output_dir={output_dir}",
            "train.progress=false",
            "train.report_to=none",
            "train.log_every=1",
            "train.learning_rate=1e-3",
            "train.mixed_precision=no",
            "train.save_every=null",
            *overrides,
        ]
    )


# --------------------------------------------------------------------------- other model families


def tiny_qwen2_config(vocab_size: int, **extra: object) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        **extra,
    )


def tiny_qwen2(vocab_size: int, seed: int = 0, **extra: object) -> Qwen2ForCausalLM:
    """A tiny Qwen2 (grouped-query attention, biased q/k/v); ``extra`` goes to its config."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_qwen2_config(vocab_size, **extra))


def tiny_qwen2_reward_model(
    vocab_size: int, seed: int = 0, **extra: object
) -> Qwen2ForSequenceClassification:
    """The tiny Qwen2 with a one-output reward head."""
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(tiny_qwen2_config(vocab_size, num_labels=1, **extra))


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """A tiny GPT-2: learned absolute position embeddings (read through ``position_ids``), no dropout."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


# --------------------------------------------------------------------------- objectives

DTYPE = torch.float64


def neg_logsigmoid(x: float) -> float:
    """``−log σ(x) = log(1 + e^{−x})``."""
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def stats_of(
    pi_w: list[float],
    pi_l: list[float],
    rho_w: list[float] | None = None,
    rho_l: list[float] | None = None,
    n_w: list[int] | None = None,
    n_l: list[int] | None = None,
    requires_grad: bool = False,
) -> PairStats:
    """PairStats from plain lists; the policy log-probs are leaf tensors when ``requires_grad``."""
    n = len(pi_w)

    def t(values: list[float] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=DTYPE)

    return PairStats(
        chosen_logps=torch.tensor(pi_w, dtype=DTYPE, requires_grad=requires_grad),
        rejected_logps=torch.tensor(pi_l, dtype=DTYPE, requires_grad=requires_grad),
        chosen_tokens=torch.tensor(n_w or [1] * n),
        rejected_tokens=torch.tensor(n_l or [1] * n),
        ref_chosen_logps=t(rho_w),
        ref_rejected_logps=t(rho_l),
    )


def objective(*loss: str, **kw: object) -> Objective:
    """The objective(s) named, built from an ``ObjectiveConfig`` with the values given."""
    return build_objective(ObjectiveConfig(loss=list(loss), **kw))  # type: ignore[arg-type]
