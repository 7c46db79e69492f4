"""Batched, no-grad log-probs of whole sets, in eval mode, through the chunked head: the pairs
evaluation compares between a policy and its reference, and sampled completions (KL estimates).
Batches go longest first, so an out-of-memory shows at the first one; answers come back in the
order asked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.layouts import collate_sequences
from ..data.packing import collate_for
from ..data.sft import TokenizedSequence
from ..data.tokenize import TokenizedPair
from .attention import choose_layout
from .logps import LogpsRequest, sequence_logps


@dataclass
class PairLogps:
    """Per-pair completion statistics of one model, each ``[B]`` (float64, on the host), in the
    pairs' order: what evaluation compares between a policy and its reference."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_norm: Tensor
    """L2 norm of the chosen completion's per-token log-probs (RewardBench's reference-free score)."""
    rejected_norm: Tensor
    chosen_entropy: Tensor | None = None
    """Sum over the chosen completion of the entropy of the model's next-token distribution, from
    :func:`pair_logps_and_entropy`: what ``−log π(y)`` would be on average were ``y`` the model's own."""
    rejected_entropy: Tensor | None = None


def _row_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def _collate(model: nn.Module, pad_token_id: int, layout: str, pack_tokens: int | None) -> Any:
    device = next(model.parameters()).device
    return collate_for(choose_layout(layout, model, device_type=device.type)[0], pad_token_id, pack_tokens)


def pair_logps(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "log-probs",
    layout: str = "auto",
    pack_tokens: int | None = None,
) -> PairLogps:
    """:func:`~preftune.model.logps.sequence_logps` of every pair, in eval mode, batched longest first (an out-of-memory
    shows at the first batch); returned in the pairs' order.

    ``layout`` (``data.layout``'s values; ``auto``: packed) is what the model's attention allows
    (:func:`~preftune.model.attention.choose_layout`: padded when it cannot take the mask); every layout
    gives the padded layout's numbers, the shared ones computing each prompt once."""
    collate = _collate(model, pad_token_id, layout, pack_tokens)
    return _pair_columns(model, pairs, collate, batch_size, (), progress, desc)


def pair_logps_and_entropy(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    batch_size: int = 8,
    layout: str = "auto",
    progress: bool = False,
) -> PairLogps:
    """:func:`pair_logps` and, in the same forward passes, each completion's summed next-token
    entropy (:attr:`PairLogps.chosen_entropy`)."""
    collate = _collate(model, pad_token_id, layout, None)
    return _pair_columns(model, pairs, collate, batch_size, ("entropy",), progress, "log-probs")


@torch.no_grad()
def _pair_columns(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    collate: Any,
    batch_size: int,
    stats: tuple[str, ...],
    progress: bool,
    desc: str,
) -> PairLogps:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Longest row first, as the reference precompute orders them: a padded row is the prompt and
    # the longer completion, so neighbours in this order pad little.
    order = sorted(range(len(pairs)), key=lambda i: -_row_length(pairs[i]))
    names = ("logps", "tokens", "norm", *stats)
    columns = {name: [torch.zeros(len(pairs), dtype=torch.float64) for _ in range(2)] for name in names}
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=None if progress else True, leave=False):
        chunk = order[start : start + batch_size]
        batch = collate([pairs[i] for i in chunk]).to(device)
        out = sequence_logps(model, batch, LogpsRequest(stats=stats, per_token=True))
        assert out.token_logps is not None
        squares = torch.zeros_like(out.logps).index_add(0, batch.label_sequence, out.token_logps**2)
        index = torch.tensor(chunk)
        values = {"logps": out.logps, "tokens": out.tokens, "norm": squares.sqrt(), **out.stats}
        for name, (chosen, rejected) in columns.items():
            chosen.index_copy_(0, index, values[name][batch.chosen].double().cpu())
            rejected.index_copy_(0, index, values[name][batch.rejected].double().cpu())
    model.train(was_training)
    entropy = columns.get("entropy", [None, None])
    return PairLogps(*columns["logps"], *columns["tokens"], *columns["norm"], *entropy)


@torch.no_grad()
def completion_logps(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int | None = None,
) -> Tensor:
    """``log π(completion | prompt)`` of each (prompt ids, completion ids), ``[N]`` float64 on the
    host in the given order; eval mode, batched longest first, through the chunked head."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = [
        TokenizedSequence([*p, *c], [0] * len(p) + [1] * len(c), i)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))
    out = torch.zeros(len(rows), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_sequences([rows[i] for i in chunk], pad_token_id).to(device)
        sums = sequence_logps(model, batch, chunk_size=chunk_size)
        out.index_copy_(0, torch.tensor(chunk), sums.logps.double().cpu())
    model.train(was_training)
    return out
