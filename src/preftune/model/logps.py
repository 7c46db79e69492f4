"""Model outputs -> per-sequence log-prob statistics, without a full-vocabulary logits tensor.

The backbone runs once over the batch and returns hidden states. Only the positions that
predict a completion token go through the lm_head, in chunks of ``chunk_size`` tokens;
each chunk's ``[chunk, vocab]`` logits live only inside the chunk (recomputed in backward
through activation checkpointing). The label's log-prob is ``logit[label] − logsumexp``,
so no ``log_softmax`` over the vocabulary is ever stored. Prompt positions never touch
the lm_head at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import pair_attention_mask
from .load import unwrap_causal_lm

if TYPE_CHECKING:
    from ..data.layouts import Batch, SequenceBatch


@dataclass
class SequenceLogps:
    """Per-sequence statistics, each ``[S]``; which sequence is which is the layout's business."""

    logps: Tensor
    """Sum of completion-token log-probs."""
    tokens: Tensor
    """Number of completion tokens (float)."""
    logits_sum: Tensor
    """Sum over completion tokens of the vocabulary-mean logit (detached; for ``logits/*`` metrics)."""
    token_logps: Tensor | None = None
    """``[N]`` each completion token's log-prob, in ``label_index`` order (when asked for)."""
    tail_logps: Tensor | None = None
    """``[S]`` sum over the tokens the batch marks as tail (``label_tail``; LD-DPO), when asked for."""
    wpo_logps: Tensor | None = None
    """``[S]`` detached ``Σ_t (log p(y_t) − log Σ_v p(v)²)`` over completion tokens (WPO's weights),
    when asked for."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """``[S]`` sums of further per-token statistics asked for (``correct``, ``entropy``)."""


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
    then Gemma-2-style soft-capping ``c·tanh(x/c)``; then, as sampling does, a temperature (PPO
    scores its samples under the distribution they were drawn from)."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

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
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits


STATS = ("mean", "log_sum_sq", "correct", "entropy")
"""Per-token statistics the chunked head can return beside the label log-prob (all detached):
the vocabulary-mean logit (``logits/*`` metrics), ``log Σ_v p_v²`` (WPO's weights), whether the
argmax is the label (token accuracy) and the entropy of the next-token distribution."""


def _head_chunk(
    head: nn.Module, hidden: Tensor, labels: Tensor, transform: LogitTransform, stats: tuple[str, ...]
) -> tuple[Tensor, dict[str, Tensor]]:
    logits = transform(head(hidden).float())
    extras: dict[str, Tensor] = {}
    with torch.no_grad():
        if "mean" in stats:
            extras["mean"] = logits.mean(dim=-1)
        if "log_sum_sq" in stats or "entropy" in stats:
            normalizer = torch.logsumexp(logits, dim=-1)
        if "log_sum_sq" in stats:  # log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)
            extras["log_sum_sq"] = torch.logsumexp(2 * logits, dim=-1) - 2 * normalizer
        if "correct" in stats:
            extras["correct"] = (logits.argmax(dim=-1) == labels).float()
        if "entropy" in stats:  # H = logsumexp(z) − Σ_v p_v z_v
            extras["entropy"] = normalizer - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return label_logps(logits, labels), extras


def chunked_label_logps(
    hidden: Tensor,
    head: nn.Module,
    labels: Tensor,
    chunk_size: int,
    transform: LogitTransform = LogitTransform(),
    stats: tuple[str, ...] = ("mean",),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Label log-probs of ``hidden [N, H]``, ``labels [N]``, ``chunk_size`` rows at a time, and the
    requested :data:`STATS` (each ``[N]``, detached)."""
    logps: list[Tensor] = []
    extras: dict[str, list[Tensor]] = {name: [] for name in stats}
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        args = (head, h, y, transform, stats)
        lp, chunk = checkpoint(_head_chunk, *args, use_reentrant=False) if recompute else _head_chunk(*args)
        logps.append(lp)
        for name, values in chunk.items():
            extras[name].append(values.detach())
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, {name: empty for name in stats}
    return torch.cat(logps), {name: torch.cat(values) for name, values in extras.items()}


def auto_chunk_size(vocab_size: int, logits_per_chunk: int = 2**25) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 128 MiB.

    Measured by ``bench/logps_memory.py`` at a 152k vocabulary: 256-token chunks use a third of
    the transient memory of 1024-token chunks at the same speed; 128 costs 10% more time.
    """
    return max(16, min(4096, logits_per_chunk // max(vocab_size, 1)))


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    label_index: Tensor,
    label_sequence: Tensor,
    num_sequences: int,
    chunk_size: int | None = None,
    position_ids: Tensor | None = None,
    with_mean_logits: bool = True,
    with_token_logps: bool = False,
    label_tail: Tensor | None = None,
    with_wpo: bool = False,
    extra_stats: tuple[str, ...] = (),
    temperature: float = 1.0,
    segment_ids: Tensor | None = None,
    label_source: Tensor | None = None,
) -> SequenceLogps:
    """Per-sequence completion log-prob statistics of a causal LM over rows ``[R, T]``.

    Token at flat position ``i`` (``label_index``) is predicted from position ``i − 1`` (or
    ``label_source``) and counts towards sequence ``label_sequence[i]``; the layout computed them
    on the host. ``segment_ids`` (rows holding several sequences) become the attention mask.
    ``label_tail`` (``[N]``) also sums the tokens it marks; ``with_wpo`` also sums WPO's
    per-token ``log p − log Σ p²``; ``extra_stats`` (``correct``, ``entropy``) are summed per
    sequence into :attr:`SequenceLogps.extras`; ``temperature`` divides the logits first.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    mask: Any = attention_mask
    if segment_ids is not None:
        mask = pair_attention_mask(segment_ids, lm.config, head.weight.dtype)
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    # Hidden state i−1 predicts token i: gather only those positions, [N, H].
    source = label_index - 1 if label_source is None else label_source
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, source)
    labels = input_ids.reshape(-1).index_select(0, label_index)
    if chunk_size is None:
        chunk_size = auto_chunk_size(int(head.weight.shape[0]))
    transform = dataclasses.replace(LogitTransform.of(lm.config), temperature=temperature)
    stats = ("mean",) * with_mean_logits + ("log_sum_sq",) * with_wpo + tuple(extra_stats)
    token_logps, extras = chunked_label_logps(selected, head, labels, chunk_size, transform, stats)
    sums = sequence_sums(
        token_logps,
        label_sequence,
        num_sequences,
        extras.get("mean"),
        label_tail,
        extras.get("log_sum_sq"),
        with_token_logps,
    )
    sums.extras = {
        name: sums.logps.new_zeros(num_sequences).index_add(0, label_sequence, extras[name])
        for name in extra_stats
    }
    return sums


def sequence_sums(
    token_logps: Tensor,
    label_sequence: Tensor,
    num_sequences: int,
    mean_logits: Tensor | None = None,
    label_tail: Tensor | None = None,
    log_sum_sq: Tensor | None = None,
    keep_token_logps: bool = False,
) -> SequenceLogps:
    """Per-token values ``[N]`` (in ``label_index`` order) summed into their ``num_sequences``
    sequences: log-probs, token counts, mean logits; the log-probs over ``label_tail``; WPO's
    ``log p − log Σ_v p_v²`` given each token's ``log_sum_sq``."""
    zeros = token_logps.new_zeros(num_sequences)

    def total(values: Tensor) -> Tensor:
        return zeros.index_add(0, label_sequence, values)

    return SequenceLogps(
        logps=total(token_logps),
        tokens=total(torch.ones_like(token_logps).detach()),
        logits_sum=total(torch.zeros_like(token_logps) if mean_logits is None else mean_logits),
        token_logps=token_logps if keep_token_logps else None,
        tail_logps=None if label_tail is None else total(token_logps * label_tail),
        wpo_logps=None if log_sum_sq is None else total(token_logps.detach() - log_sum_sq),
    )


def batch_logps(
    model: nn.Module,
    batch: Batch | SequenceBatch,
    chunk_size: int | None = None,
    with_mean_logits: bool = True,
    with_token_logps: bool = False,
    with_tails: bool = False,
    with_wpo: bool = False,
    extra_stats: tuple[str, ...] = (),
    temperature: float = 1.0,
) -> SequenceLogps:
    """:func:`sequence_logps` of every sequence of a :class:`~preftune.data.layouts.Batch`
    (``with_token_logps``: also each completion token's, in ``batch.label_index`` order;
    ``with_tails``: also the sums over ``batch.label_tail``; ``with_wpo``: WPO's sums;
    ``temperature``: of the distribution ``logits / temperature``)."""
    return sequence_logps(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.label_index,
        batch.label_sequence,
        batch.num_sequences,
        chunk_size,
        batch.position_ids,
        with_mean_logits,
        with_token_logps,
        batch.label_tail if with_tails else None,
        with_wpo,
        extra_stats,
        temperature,
        getattr(batch, "segment_ids", None),
        getattr(batch, "label_source", None),
    )


def full_logits_sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor:
    """Plain reference implementation: full ``[R, T, V]`` logits, ``log_softmax``, gather. For tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    per_token = torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token * completion_mask[:, 1:]).sum(dim=1)


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that its forward returns :class:`SequenceLogps` of a batch.

    Data-parallel wrappers (DDP/FSDP through ``accelerate``) must see the call as this
    module's forward for their gradient hooks, hence a module rather than a function.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int | None = None,
        with_tails: bool = False,
        with_wpo: bool = False,
        extra_stats: tuple[str, ...] = (),
        with_mean_logits: bool | None = None,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.with_tails = with_tails
        self.with_wpo = with_wpo
        self.extra_stats = extra_stats
        self.with_mean_logits = not extra_stats if with_mean_logits is None else with_mean_logits

    def forward(self, batch: Batch | SequenceBatch, only_logps: bool = False) -> SequenceLogps:
        """The statistics this module was built for; ``only_logps``: the log-probs and token counts
        alone (KTO's KL sequences, which no metric reads)."""
        if only_logps:
            return batch_logps(self.model, batch, self.chunk_size, with_mean_logits=False)
        return batch_logps(
            self.model,
            batch,
            self.chunk_size,
            with_mean_logits=self.with_mean_logits,
            with_tails=self.with_tails,
            with_wpo=self.with_wpo,
            extra_stats=self.extra_stats,
        )
