"""Model outputs -> per-sequence log-prob statistics, without a full-vocabulary logits tensor.

The backbone runs once over the batch and returns hidden states. Only the positions that
predict a completion token go through the lm_head, in chunks of ``chunk_size`` tokens;
each chunk's ``[chunk, vocab]`` logits live only inside the chunk (recomputed in backward
through activation checkpointing). The label's log-prob is ``logit[label] − logsumexp``,
so no ``log_softmax`` over the vocabulary is ever stored. Prompt positions never touch
the lm_head at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class SequenceLogps:
    """Per-row statistics, each ``[R]`` (R = 2B rows: chosen then rejected)."""

    logps: Tensor
    """Sum of completion-token log-probs."""
    tokens: Tensor
    """Number of completion tokens (float)."""
    logits_sum: Tensor
    """Sum over completion tokens of the vocabulary-mean logit (detached; for ``logits/*`` metrics)."""

    def halves(self) -> tuple[SequenceLogps, SequenceLogps]:
        rows = self.logps.shape[0] // 2
        return (
            SequenceLogps(self.logps[:rows], self.tokens[:rows], self.logits_sum[:rows]),
            SequenceLogps(self.logps[rows:], self.tokens[rows:], self.logits_sum[rows:]),
        )


def label_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """``log softmax(logits)[label]`` as ``logit[label] − logsumexp(logits)``, in float32.

    ``logits`` is ``[..., V]``, ``labels`` is ``[...]``; returns ``[...]``.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to ``lm_head(h)`` before the softmax: a scale (Cohere's
    ``logit_scale``, Granite's ``1/logits_scaling``, Falcon-H1's ``lm_head_multiplier``),
    then Gemma-2-style soft-capping ``c·tanh(x/c)``."""

    scale: float = 1.0
    softcap: float | None = None

    @staticmethod
    def of(config: Any) -> LogitTransform:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = getattr(text, "logit_scale", None)
        if scale is None:
            scale = getattr(text, "lm_head_multiplier", None)
        if scale is None and getattr(text, "logits_scaling", None):
            scale = 1.0 / text.logits_scaling
        softcap = getattr(text, "final_logit_softcapping", None)
        return LogitTransform(1.0 if scale is None else float(scale), softcap)

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _head_chunk(
    head: nn.Module, hidden: Tensor, labels: Tensor, transform: LogitTransform
) -> tuple[Tensor, Tensor]:
    logits = transform(head(hidden).float())
    return label_logps(logits, labels), logits.mean(dim=-1)


def chunked_label_logps(
    hidden: Tensor,
    head: nn.Module,
    labels: Tensor,
    chunk_size: int,
    transform: LogitTransform = LogitTransform(),
) -> tuple[Tensor, Tensor]:
    """Label log-probs and vocab-mean logits of ``hidden [N, H]``, ``labels [N]``, ``chunk_size`` rows at a time."""
    logps, means = [], []
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if recompute:
            lp, mean = checkpoint(_head_chunk, head, h, y, transform, use_reentrant=False)
        else:
            lp, mean = _head_chunk(head, h, y, transform)
        logps.append(lp)
        means.append(mean.detach())
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(means)


def unwrap_causal_lm(model: nn.Module) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (adapters stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk_size: int = 1024,
) -> SequenceLogps:
    """Per-row completion log-prob statistics of a causal LM. Inputs are ``[R, T]``.

    Token ``t`` is predicted from position ``t − 1``; a row's statistics cover the tokens
    where ``completion_mask`` is 1.
    """
    lm = unwrap_causal_lm(model)
    backbone = lm.get_decoder()
    head = lm.get_output_embeddings()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = completion_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target)[target]
    selected = hidden[:, :-1][target]  # [N, H]: positions that predict a completion token
    labels = input_ids[:, 1:][target]
    transform = LogitTransform.of(lm.config)
    token_logps, mean_logits = chunked_label_logps(selected, head, labels, chunk_size, transform)
    n_rows = input_ids.shape[0]
    zeros = torch.zeros(n_rows, device=input_ids.device, dtype=torch.float32)
    return SequenceLogps(
        logps=zeros.index_add(0, rows, token_logps),
        tokens=target.sum(dim=1).float(),
        logits_sum=zeros.index_add(0, rows, mean_logits),
    )


def full_logits_sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor:
    """Plain reference implementation: full ``[R, T, V]`` logits, ``log_softmax``, gather. For tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    per_token = torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token * completion_mask[:, 1:]).sum(dim=1)


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that its forward returns :class:`SequenceLogps`.

    Data-parallel wrappers (DDP/FSDP through ``accelerate``) must see the call as this
    module's forward for their gradient hooks, hence a module rather than a function.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> SequenceLogps:
        return sequence_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size)
