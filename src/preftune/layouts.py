"""Collation of tokenized pairs into a batch layout.

The padded layout matches TRL's: ``2B`` right-padded rows, the B ``prompt + chosen``
rows first, then the B ``prompt + rejected`` rows, with a completion mask that marks
the completion tokens (the only ones whose log-probs count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .data import TokenizedPair
from .logps import label_index_of


@dataclass
class Batch:
    """A padded batch of B pairs. ``input_ids``, ``attention_mask``, ``completion_mask`` are ``[2B, T]``."""

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    indices: Tensor
    """``[B]`` dataset index of each pair (keys of the precomputed reference cache)."""
    label_index: Tensor
    """``[N]`` flat positions of the predicted completion tokens (:func:`preftune.logps.label_index_of`)."""

    @property
    def num_pairs(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Batch:
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    completion = [[0] * len(p.prompt_ids) + [1] * len(p.chosen_ids) for p in pairs] + [
        [0] * len(p.prompt_ids) + [1] * len(p.rejected_ids) for p in pairs
    ]
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, completion, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, : len(row)] = torch.tensor(mask)
    indices = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return Batch(input_ids, attention_mask, completion_mask, indices, label_index_of(completion_mask))
