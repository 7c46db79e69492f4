"""Collation of tokenized pairs into a batch layout that carries its own mapping.

A :class:`Batch` says where everything is: ``label_index`` / ``label_sequence`` place
every predicted completion token in the rows and in a sequence; ``chosen`` / ``rejected``
name each pair's two sequences; ``last_index`` is each sequence's last token (where a
reward model reads its score); ``label_tail`` marks the tokens past the shorter completion of
their pair (LD-DPO). Log-probs, references, objectives and reward models use
only these maps, so a layout that packs several sequences into one row (prefix sharing,
padding-free packing) drops in as a new collate function.

The padded layout matches TRL's: ``2B`` right-padded rows, the B ``prompt + chosen``
rows first, then the B ``prompt + rejected`` rows. Unpaired examples (KTO) collate into an
:class:`UnpairedBatch`: two :class:`SequenceBatch` layouts, the examples' own sequences and the
mismatched ones of the KL estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from . import TokenizedPair, TokenizedUnpaired
from .sft import TokenizedSequence


@dataclass
class Batch:
    """Rows ``[R, T]`` holding S sequences that form B pairs (padded: R = S = 2B)."""

    input_ids: Tensor
    attention_mask: Tensor
    label_index: Tensor
    """``[N]`` flat positions (into ``input_ids.view(-1)``) of the predicted completion tokens."""
    label_sequence: Tensor
    """``[N]`` the sequence each of those tokens belongs to."""
    last_index: Tensor
    """``[S]`` flat position of each sequence's last token."""
    chosen: Tensor
    """``[B]`` the sequence holding each pair's chosen completion."""
    rejected: Tensor
    """``[B]`` the sequence holding each pair's rejected completion."""
    pair_index: Tensor
    """``[B]`` dataset index of each pair (keys of the precomputed reference cache)."""
    margins: Tensor
    """``[B]`` per-pair margin of a reward model's loss (0 where the data has none)."""
    label_tail: Tensor
    """``[N]`` True for the tokens past the length of the shorter completion of their pair
    (LD-DPO's tail; :func:`tail_of`)."""
    completion_mask: Tensor | None = None
    """``[R, T]`` 1 on completion tokens (padded layout; for tests and plain reference paths)."""
    position_ids: Tensor | None = None
    """``[R, T]``; None: ``0 … T−1`` in every row."""
    segment_ids: Tensor | None = None
    """``[R, T]`` for rows holding more than one sequence (prefix-shared, packed): ``3·k + part``
    for the k-th pair of the row (part 0 prompt, 1 chosen, 2 rejected), −1 on padding; the forward
    turns it into the attention mask (:mod:`preftune.model.attention`). None: one sequence per row."""
    label_source: Tensor | None = None
    """``[N]`` flat position of the hidden state that predicts each label; None: ``label_index − 1``
    (a rejected completion's first token is predicted from the end of a prompt it does not follow)."""
    shared_tokens: Tensor | None = None
    """Prompt tokens computed once for two sequences; ``num_tokens`` adds them back, so it counts
    as the padded layout (and TRL) does."""

    @property
    def num_pairs(self) -> int:
        return int(self.pair_index.shape[0])

    @property
    def num_sequences(self) -> int:
        return int(self.last_index.shape[0])

    @property
    def num_examples(self) -> int:
        """What the harness counts and normalizes by: pairs."""
        return self.num_pairs

    @property
    def num_tokens(self) -> Tensor:
        tokens = self.attention_mask.sum()
        return tokens if self.shared_tokens is None else tokens + self.shared_tokens

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**_moved(self, device))


def _moved(batch: Any, device: torch.device | str) -> dict[str, Any]:
    """A batch dataclass's tensors on ``device`` (fields that are None stay None)."""
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return {name: None if v is None else v.to(device, non_blocking=True) for name, v in values.items()}


def label_index_of(completion_mask: Tensor) -> Tensor:
    """Flat indices (into ``input_ids.view(-1)``) of the completion tokens that have a predecessor.

    Computed once per batch on the host by the collator, so the forward needs no boolean
    masking (each of which is a device-to-host sync).
    """
    width = completion_mask.shape[1]
    rows, cols = completion_mask[:, 1:].nonzero(as_tuple=True)
    return rows * width + cols + 1


def tail_of(label_sequence: Tensor, chosen: Tensor, rejected: Tensor, num_sequences: int) -> Tensor:
    """``[N]`` True where a completion token lies past the shorter completion of its pair.

    Token ``k`` (counting from 0 in ``label_index`` order, which lists each sequence's tokens
    left to right) of a sequence is in the tail when ``k ≥ min(|y_w|, |y_l|)`` of its pair:
    LD-DPO's split of a completion into the part both completions share in length and the rest.
    """
    count = label_sequence.shape[0]
    tokens = torch.bincount(label_sequence, minlength=num_sequences)
    order = torch.sort(label_sequence, stable=True).indices
    starts = torch.cumsum(tokens, 0) - tokens
    rank = torch.empty(count, dtype=torch.long)
    rank[order] = torch.arange(count) - starts[label_sequence[order]]
    shared = torch.zeros(num_sequences, dtype=torch.long)
    shortest = torch.minimum(tokens[chosen], tokens[rejected])
    shared[chosen], shared[rejected] = shortest, shortest
    return rank >= shared[label_sequence]


def pad_rows(
    rows: Sequence[Sequence[int]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Tensor:
    """Right-padded ``[R, T]`` token ids."""
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    """The padded layout: one right-padded row per sequence, chosen rows first."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompts = [len(p.prompt_ids) for p in pairs] * 2
    input_ids = pad_rows(rows, pad_token_id, pad_to_multiple_of)
    lengths = torch.tensor([len(r) for r in rows])
    positions = torch.arange(input_ids.shape[1])
    attention_mask = (positions < lengths[:, None]).long()
    completion_mask = (attention_mask.bool() & (positions >= torch.tensor(prompts)[:, None])).long()
    label_index = label_index_of(completion_mask)
    width = input_ids.shape[1]
    count = len(pairs)
    label_sequence = torch.div(label_index, width, rounding_mode="floor")
    chosen, rejected = torch.arange(count), torch.arange(count, 2 * count)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        label_index=label_index,
        label_sequence=label_sequence,
        last_index=torch.arange(len(rows)) * width + lengths - 1,
        chosen=chosen,
        rejected=rejected,
        pair_index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        margins=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        label_tail=tail_of(label_sequence, chosen, rejected, len(rows)),
        completion_mask=completion_mask,
    )


@dataclass
class SequenceBatch:
    """Rows ``[R, T]`` of single sequences (supervised fine-tuning): one sequence per row."""

    input_ids: Tensor
    attention_mask: Tensor
    label_index: Tensor
    """``[N]`` flat positions of the tokens that carry the loss (each predicted from the one before)."""
    label_sequence: Tensor
    """``[N]`` the row each of those tokens belongs to."""
    index: Tensor
    """``[R]`` dataset index of each sequence."""
    position_ids: Tensor | None = None
    label_tail: Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_examples(self) -> int:
        return self.num_sequences

    @property
    def num_tokens(self) -> Tensor:
        return self.attention_mask.sum()

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(**_moved(self, device))


def collate_sequences(sequences: Sequence[Any], pad_token_id: int) -> SequenceBatch:
    """Right-padded rows of ``TokenizedSequence`` (``input_ids``, ``loss_mask``, ``index``)."""
    input_ids = pad_rows([s.input_ids for s in sequences], pad_token_id)
    lengths = torch.tensor([len(s.input_ids) for s in sequences])
    positions = torch.arange(input_ids.shape[1])
    attention_mask = (positions < lengths[:, None]).long()
    loss_mask = pad_rows([s.loss_mask for s in sequences], 0)
    label_index = label_index_of(loss_mask)
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        label_index=label_index,
        label_sequence=torch.div(label_index, input_ids.shape[1], rounding_mode="floor"),
        index=torch.tensor([s.index for s in sequences], dtype=torch.long),
    )


@dataclass
class UnpairedBatch:
    """B unpaired examples: ``completions`` holds each ``prompt + completion`` row; ``kl`` (when
    the objective estimates KL) each prompt followed by another example's completion
    (:func:`kl_partners`); ``desirable`` ``[B]`` the labels."""

    completions: SequenceBatch
    desirable: Tensor
    kl: SequenceBatch | None = None

    @property
    def num_examples(self) -> int:
        return self.completions.num_sequences

    @property
    def num_tokens(self) -> Tensor:
        """The examples' own tokens, as TRL counts ``num_tokens`` (the KL rows are not trained on)."""
        return self.completions.num_tokens

    def to(self, device: torch.device | str) -> UnpairedBatch:
        kl = None if self.kl is None else self.kl.to(device)
        return UnpairedBatch(self.completions.to(device), self.desirable.to(device), kl)


def kl_partners(count: int) -> list[int]:
    """For each example of a batch, the example whose completion its KL sequence borrows: the one
    before it, the first taking the last's (TRL rotates the completions by one:
    ``(x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1})``), so the KL sequences use the batch's own
    completions, each with another prompt."""
    return [(i - 1) % count for i in range(count)]


def collate_unpaired(
    examples: Sequence[TokenizedUnpaired],
    pad_token_id: int,
    max_length: int | None = None,
    with_kl: bool = True,
) -> UnpairedBatch:
    """Right-padded rows ``prompt + completion`` (and with ``with_kl`` ``prompt_i + completion_j``,
    ``j`` from :func:`kl_partners`), each cut to ``max_length`` keeping its start, as TRL's collator."""

    def rows(completions: list[list[int]]) -> SequenceBatch:
        sequences = [
            TokenizedSequence(
                (e.prompt_ids + completion)[:max_length],
                ([0] * len(e.prompt_ids) + [1] * len(completion))[:max_length],
                e.index,
                e.where,
            )
            for e, completion in zip(examples, completions, strict=True)
        ]
        return collate_sequences(sequences, pad_token_id)

    own = [e.completion_ids for e in examples]
    kl = rows([own[j] for j in kl_partners(len(examples))]) if with_kl else None
    desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    return UnpairedBatch(rows(own), desirable, kl)
