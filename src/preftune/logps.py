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
    head: nn.Module, hidden: Tensor, labels: Tensor, transform: LogitTransform, with_mean: bool
) -> tuple[Tensor, Tensor]:
    logits = transform(head(hidden).float())
    mean = logits.mean(dim=-1) if with_mean else logits.new_zeros(logits.shape[0])
    return label_logps(logits, labels), mean


def chunked_label_logps(
    hidden: Tensor,
    head: nn.Module,
    labels: Tensor,
    chunk_size: int,
    transform: LogitTransform = LogitTransform(),
    with_mean: bool = True,
) -> tuple[Tensor, Tensor]:
    """Label log-probs and vocab-mean logits of ``hidden [N, H]``, ``labels [N]``, ``chunk_size`` rows at a time."""
    logps, means = [], []
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if recompute:
            lp, mean = checkpoint(_head_chunk, head, h, y, transform, with_mean, use_reentrant=False)
        else:
            lp, mean = _head_chunk(head, h, y, transform, with_mean)
        logps.append(lp)
        means.append(mean.detach())
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(means)


def auto_chunk_size(vocab_size: int, logits_per_chunk: int = 2**25) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 128 MiB.

    Measured by ``bench/logps_memory.py`` at a 152k vocabulary: 256-token chunks use a third of
    the transient memory of 1024-token chunks at the same speed; 128 costs 10% more time.
    """
    return max(16, min(4096, logits_per_chunk // max(vocab_size, 1)))


def unwrap_causal_lm(model: nn.Module) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (adapters stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def label_index_of(completion_mask: Tensor) -> Tensor:
    """Flat indices (into ``input_ids.view(-1)``) of the completion tokens that have a predecessor.

    Computed once per batch on the host by the collator, so the forward needs no boolean
    masking (each of which is a device-to-host sync).
    """
    width = completion_mask.shape[1]
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)
    return rows * width + cols + 1


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk_size: int | None = None,
    label_index: Tensor | None = None,
    with_mean_logits: bool = True,
) -> SequenceLogps:
    """Per-row completion log-prob statistics of a causal LM. Inputs are ``[R, T]``.

    Token ``t`` is predicted from position ``t − 1``; a row's statistics cover the tokens
    where ``completion_mask`` is 1. ``label_index`` is :func:`label_index_of` precomputed.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    if label_index is None:
        label_index = label_index_of(completion_mask)
    width = input_ids.shape[1]
    # Hidden state t−1 predicts token t: gather only those positions, [N, H].
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_index - 1)
    labels = input_ids.reshape(-1).index_select(0, label_index)
    rows = torch.div(label_index, width, rounding_mode="floor")
    if chunk_size is None:
        chunk_size = auto_chunk_size(int(head.weight.shape[0]))
    transform = LogitTransform.of(lm.config)
    token_logps, mean_logits = chunked_label_logps(
        selected, head, labels, chunk_size, transform, with_mean_logits
    )
    zeros = torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32)
    return SequenceLogps(
        logps=zeros.index_add(0, rows, token_logps),
        tokens=completion_mask[:, 1:].sum(dim=1).float(),
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

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        completion_mask: Tensor,
        label_index: Tensor | None = None,
    ) -> SequenceLogps:
        return sequence_logps(
            self.model, input_ids, attention_mask, completion_mask, self.chunk_size, label_index
        )
