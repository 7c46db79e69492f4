"""The prefix-shared and packed layouts: a pair's prompt is computed once, and no row is padding.

Prefix-shared: one row per pair, ``[prompt | chosen | rejected]``. Rejected attends to the prompt
and to itself, never to chosen, and its position ids continue from the prompt's end, so each
completion sees exactly what it sees in its own padded row; the prompt's forward and backward
run once instead of twice.

Packed: the same pair blocks, several to a row up to a token budget (first-fit, longest first),
position ids starting from 0 in every pair, a mask that keeps the pairs apart. Only the end of a
row is padding. The micro-batch is still a number of pairs, so losses and metrics are the
padded layout's.

Both keep the padded layout's sequence numbering (pair b's chosen is sequence b, its rejected
B + b) and list the labels in the same order, so the chunked head sees the same tokens in the same
order and everything downstream (references, objectives, metrics) is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from . import TokenizedPair
from .layouts import Batch, collate_pairs, tail_of

LAYOUTS = ("padded", "prefix_shared", "packed")


def pair_length(pair: TokenizedPair) -> int:
    """Tokens of the pair's ``[prompt | chosen | rejected]`` block."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``budget`` tokens: longest first, each into the first
    row with room (a block longer than the budget gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def collate_prefix_shared(pairs: Sequence[TokenizedPair], pad_token_id: int) -> Batch:
    """One ``[prompt | chosen | rejected]`` row per pair."""
    return collate_shared_rows(pairs, [[i] for i in range(len(pairs))], pad_token_id)


def collate_packed(pairs: Sequence[TokenizedPair], pad_token_id: int, max_tokens: int | None = None) -> Batch:
    """Pair blocks packed first-fit into rows of ``max_tokens`` (None: the longest block's length,
    so no row is wider than the prefix-shared layout's)."""
    lengths = [pair_length(p) for p in pairs]
    return collate_shared_rows(pairs, first_fit(lengths, max_tokens or max(lengths)), pad_token_id)


def collate_shared_rows(pairs: Sequence[TokenizedPair], rows: list[list[int]], pad_token_id: int) -> Batch:
    """Rows holding the pairs ``rows[r]`` (indices into ``pairs``) as prefix-shared blocks."""
    count = len(pairs)
    width = max(sum(pair_length(pairs[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * (2 * count)
    sources: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * (2 * count)
    last_index = torch.zeros(2 * count, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for slot, i in enumerate(row):
            pair = pairs[i]
            prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            end = start + prompt + chosen + rejected
            input_ids[r, start:end] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            parts = torch.tensor([0] * prompt + [1] * chosen + [2] * rejected)
            segment_ids[r, start:end] = 3 * slot + parts
            position_ids[r, start:end] = torch.cat(
                [torch.arange(prompt + chosen), torch.arange(prompt, prompt + rejected)]
            )
            # Flat positions. Without a prompt, a completion's first token has no predecessor
            # (as in the padded layout, it is not scored).
            prompt_end = r * width + start + prompt
            skip = int(prompt == 0)
            labels[i] = prompt_end + torch.arange(skip, chosen)
            sources[i] = labels[i] - 1
            labels[count + i] = prompt_end + chosen + torch.arange(skip, rejected)
            sources[count + i] = labels[count + i] - 1
            if rejected and not skip:  # rejected's first token follows the prompt, not chosen
                sources[count + i][0] = prompt_end - 1
            last_index[i], last_index[count + i] = prompt_end + chosen - 1, prompt_end + chosen + rejected - 1
            start = end
    label_index = torch.cat(labels)
    label_sequence = torch.repeat_interleave(torch.arange(2 * count), torch.tensor([len(x) for x in labels]))
    chosen_seq, rejected_seq = torch.arange(count), torch.arange(count, 2 * count)
    return Batch(
        input_ids=input_ids,
        attention_mask=(segment_ids >= 0).long(),
        label_index=label_index,
        label_sequence=label_sequence,
        last_index=last_index,
        chosen=chosen_seq,
        rejected=rejected_seq,
        pair_index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        margins=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        label_tail=tail_of(label_sequence, chosen_seq, rejected_seq, 2 * count),
        position_ids=position_ids,
        segment_ids=segment_ids,
        label_source=torch.cat(sources),
        shared_tokens=torch.tensor(sum(len(p.prompt_ids) for p in pairs)),
    )


def collate_for(layout: str, pad_token_id: int, pack_tokens: int | None = None) -> Callable[..., Batch]:
    """The collate function of a layout (``padded``, ``prefix_shared``, ``packed``)."""
    if layout == "packed":
        return partial(collate_packed, pad_token_id=pad_token_id, max_tokens=pack_tokens)
    if layout == "prefix_shared":
        return partial(collate_prefix_shared, pad_token_id=pad_token_id)
    return partial(collate_pairs, pad_token_id=pad_token_id)
