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


STATS = ("mean_logit", "log_sum_sq", "correct", "entropy")
"""Per-token statistics the chunked head can return beside the label log-prob (all detached):
the vocabulary-mean logit (``logits/*`` metrics), ``log Σ_v p_v²`` (the distribution's collision
probability), whether the argmax is the label (token accuracy) and the entropy of the next-token
distribution."""


@dataclass(frozen=True)
class LogpsRequest:
    """What the chunked head computes beside each sequence's summed completion log-probs and token
    count. It names per-token statistics and the batch's per-token masks, never an objective: the
    code that knows an objective asks for what that objective reads."""

    stats: tuple[str, ...] = ()
    """Detached per-token statistics to compute (:data:`STATS`), each summed per sequence into
    :attr:`SequenceLogps.stats`."""
    per_token: bool = False
    """Also keep each completion token's log-prob and statistics (:attr:`SequenceLogps.token_logps`,
    :attr:`SequenceLogps.token_stats`)."""
    masks: tuple[str, ...] = ()
    """``[N]`` per-token masks of the batch, by field name (``label_tail``), over which the log-probs
    are also summed (:attr:`SequenceLogps.masked_logps`, with their gradient)."""
    temperature: float = 1.0
    """The log-probs are those of ``logits / temperature`` (PPO scores its samples under the
    distribution they were drawn from)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.stats if name not in STATS]
        if unknown:
            raise ValueError(f"unknown per-token statistics {unknown}; known: {list(STATS)}")


@dataclass
class SequenceLogps:
    """Per-sequence statistics, each ``[S]`` unless said; which sequence is which is the layout's
    business. What is there beside ``logps`` and ``tokens`` is what the :class:`LogpsRequest` asked."""

    logps: Tensor
    """Sum of completion-token log-probs."""
    tokens: Tensor
    """Number of completion tokens (float)."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """Sum over completion tokens of each per-token statistic asked for (detached)."""
    masked_logps: dict[str, Tensor] = field(default_factory=dict)
    """Sum of the log-probs of the tokens each mask asked for marks."""
    token_logps: Tensor | None = None
    """``[N]`` each completion token's log-prob, in ``label_index`` order (when asked for)."""
    token_stats: dict[str, Tensor] = field(default_factory=dict)
    """``[N]`` each completion token's statistics, in ``label_index`` order (when asked for)."""


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


def _head_chunk(
    head: nn.Module, hidden: Tensor, labels: Tensor, transform: LogitTransform, stats: tuple[str, ...]
) -> tuple[Tensor, dict[str, Tensor]]:
    logits = transform(head(hidden).float())
    token_stats: dict[str, Tensor] = {}
    with torch.no_grad():
        if "mean_logit" in stats:
            token_stats["mean_logit"] = logits.mean(dim=-1)
        if "log_sum_sq" in stats or "entropy" in stats:
            normalizer = torch.logsumexp(logits, dim=-1)
        if "log_sum_sq" in stats:  # log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z)
            token_stats["log_sum_sq"] = torch.logsumexp(2 * logits, dim=-1) - 2 * normalizer
        if "correct" in stats:
            token_stats["correct"] = (logits.argmax(dim=-1) == labels).float()
        if "entropy" in stats:  # H = logsumexp(z) − Σ_v p_v z_v
            token_stats["entropy"] = normalizer - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return label_logps(logits, labels), token_stats


def chunked_label_logps(
    hidden: Tensor,
    head: nn.Module,
    labels: Tensor,
    chunk_size: int,
    transform: LogitTransform = LogitTransform(),
    stats: tuple[str, ...] = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """Label log-probs of ``hidden [N, H]``, ``labels [N]``, ``chunk_size`` rows at a time, and the
    requested :data:`STATS` (each ``[N]``, detached)."""
    logps: list[Tensor] = []
    token_stats: dict[str, list[Tensor]] = {name: [] for name in stats}
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        args = (head, h, y, transform, stats)
        lp, chunk = checkpoint(_head_chunk, *args, use_reentrant=False) if recompute else _head_chunk(*args)
        logps.append(lp)
        for name, values in chunk.items():
            token_stats[name].append(values.detach())
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, {name: empty for name in stats}
    return torch.cat(logps), {name: torch.cat(values) for name, values in token_stats.items()}


def auto_chunk_size(vocab_size: int, logits_per_chunk: int = 2**25) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 128 MiB.

    Measured by ``bench/logps_memory.py`` at a 152k vocabulary: 256-token chunks use a third of
    the transient memory of 1024-token chunks at the same speed; 128 costs 10% more time.
    """
    return max(16, min(4096, logits_per_chunk // max(vocab_size, 1)))


def sequence_logps(
    model: nn.Module,
    batch: Batch | SequenceBatch,
    request: LogpsRequest = LogpsRequest(),
    chunk_size: int | None = None,
) -> SequenceLogps:
    """Per-sequence completion log-prob statistics of a causal LM over a batch's rows ``[R, T]``.

    Token at flat position ``i`` (``batch.label_index``) is predicted from position ``i − 1`` (or
    ``batch.label_source``) and counts towards sequence ``batch.label_sequence[i]``; the layout
    computed them on the host. ``batch.segment_ids`` (rows holding several sequences) become the
    attention mask. ``request`` says what else to compute.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    mask: Any = batch.attention_mask
    segment_ids = getattr(batch, "segment_ids", None)
    if segment_ids is not None:
        mask = pair_attention_mask(segment_ids, lm.config, head.weight.dtype)
    hidden = lm.get_decoder()(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    # Hidden state i−1 predicts token i: gather only those positions, [N, H].
    label_source = getattr(batch, "label_source", None)
    source = batch.label_index - 1 if label_source is None else label_source
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, source)
    labels = batch.input_ids.reshape(-1).index_select(0, batch.label_index)
    if chunk_size is None:
        chunk_size = auto_chunk_size(int(head.weight.shape[0]))
    transform = dataclasses.replace(LogitTransform.of(lm.config), temperature=request.temperature)
    token_logps, token_stats = chunked_label_logps(
        selected, head, labels, chunk_size, transform, request.stats
    )
    return sequence_sums(token_logps, token_stats, batch, request)


def sequence_sums(
    token_logps: Tensor, token_stats: dict[str, Tensor], batch: Batch | SequenceBatch, request: LogpsRequest
) -> SequenceLogps:
    """Per-token values ``[N]`` (in ``batch.label_index`` order) summed into the batch's sequences:
    log-probs, token counts, each statistic of ``token_stats``, and the log-probs over each of the
    request's masks; the per-token values themselves kept when the request says so."""
    zeros = token_logps.new_zeros(batch.num_sequences)

    def total(values: Tensor) -> Tensor:
        return zeros.index_add(0, batch.label_sequence, values)

    def mask(name: str) -> Tensor:
        values: Tensor | None = getattr(batch, name, None)
        if values is None:
            raise ValueError(f"the batch has no per-token mask '{name}'")
        return values

    return SequenceLogps(
        logps=total(token_logps),
        tokens=total(torch.ones_like(token_logps).detach()),
        stats={name: total(values) for name, values in token_stats.items()},
        masked_logps={name: total(token_logps * mask(name)) for name in request.masks},
        token_logps=token_logps if request.per_token else None,
        token_stats=token_stats if request.per_token else {},
    )


def full_logits_sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor:
    """Plain reference implementation: full ``[R, T, V]`` logits, ``log_softmax``, gather. For tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    per_token = torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token * completion_mask[:, 1:]).sum(dim=1)


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that its forward returns the :class:`SequenceLogps` of a batch that
    ``request`` asks for.

    Data-parallel wrappers (DDP/FSDP through ``accelerate``) must see the call as this
    module's forward for their gradient hooks, hence a module rather than a function.
    """

    def __init__(
        self, model: nn.Module, request: LogpsRequest = LogpsRequest(), chunk_size: int | None = None
    ):
        super().__init__()
        self.model = model
        self.request = request
        self.chunk_size = chunk_size

    def forward(self, batch: Batch | SequenceBatch, only_logps: bool = False) -> SequenceLogps:
        """The statistics this module was built for; ``only_logps``: the log-probs and token counts
        alone (KTO's KL sequences, which no metric reads)."""
        return sequence_logps(
            self.model, batch, LogpsRequest() if only_logps else self.request, self.chunk_size
        )
