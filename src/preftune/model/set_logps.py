"""Batched, no-grad log-probs of whole sets, in eval mode, through the chunked head: the pairs
evaluation compares between a policy and its reference, and sampled completions (KL estimates).
Batches go longest first, so an out-of-memory shows at the first one; answers come back in the
order asked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def _row_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


@torch.no_grad()
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
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = collate_for(choose_layout(layout, model, device_type=device.type)[0], pad_token_id, pack_tokens)
    # Longest row first, as the reference precompute orders them: a padded row is the prompt and
    # the longer completion, so neighbours in this order pad little.
    order = sorted(range(len(pairs)), key=lambda i: -_row_length(pairs[i]))
    columns = [torch.zeros(len(pairs), dtype=torch.float64) for _ in range(6)]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=None if progress else True, leave=False):
        chunk = order[start : start + batch_size]
        batch = collate([pairs[i] for i in chunk]).to(device)
        out = sequence_logps(model, batch, LogpsRequest(per_token=True))
        assert out.token_logps is not None
        squares = torch.zeros_like(out.logps).index_add(0, batch.label_sequence, out.token_logps**2)
        index = torch.tensor(chunk)
        for k, values in enumerate((out.logps, out.tokens, squares.sqrt())):
            columns[2 * k].index_copy_(0, index, values[batch.chosen].double().cpu())
            columns[2 * k + 1].index_copy_(0, index, values[batch.rejected].double().cpu())
    model.train(was_training)
    return PairLogps(*columns)


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
