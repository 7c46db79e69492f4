"""Attention masks for layouts that put more than one sequence in a row, through the model's own attention.

A prefix-shared or packed row holds ``[prompt | chosen | rejected]`` of one or more pairs. The
layout marks each token with a segment id, ``3·k + part`` for the k-th pair of the row (part 0
prompt, 1 chosen, 2 rejected; −1 on padding). A query attends to an earlier key of its own segment
or of its pair's prompt, so rejected never sees chosen, and no pair sees another:

    allowed(q, k) = k ≤ q  and  (seg[k] = seg[q]  or  seg[k] = seg[q] − seg[q] mod 3)

transformers (5.x) passes a 4D mask given as ``attention_mask`` straight to the attention
functions: a boolean ``[R, 1, T, T]`` for SDPA, an additive float one for eager, a ``BlockMask``
for flex attention (which then skips the blocks the mask rules out). Flash-attention kernels take
only contiguous causal segments (varlen), which cannot express a rejected completion that sees a
prompt it does not follow, so a model running on them keeps the padded layout.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from .load import unwrap_causal_lm

MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take a custom mask."""


def allowed_pairs(segment_ids: Tensor) -> Tensor:
    """``[R, T, T]`` True where query ``q`` (dim 1) may attend to key ``k`` (dim 2)."""
    width = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    return ((key == query) | (key == query - query % 3)) & causal


def pair_attention_mask(segment_ids: Tensor, config: Any, dtype: torch.dtype) -> Any:
    """The mask the model's attention implementation takes for rows marked with ``segment_ids``."""
    implementation = config._attn_implementation
    if implementation == "flex_attention":
        return _block_mask(segment_ids)
    allowed = allowed_pairs(segment_ids)[:, None]
    if implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def _block_mask(segment_ids: Tensor) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        seg_q, seg_k = segment_ids[b, q], segment_ids[b, k]
        return (k <= q) & ((seg_k == seg_q) | (seg_k == seg_q - seg_q % 3))

    rows, width = segment_ids.shape
    return create_block_mask(mask_mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment_ids.device)


def shared_layout_refusal(model: Any, device_type: str = "cpu") -> str | None:
    """Why ``model``, trained on a ``device_type`` device, cannot run the prefix-shared and packed
    layouts, or None when it can."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        return f"its attention implementation '{implementation}' takes no custom mask"
    if implementation == "flex_attention" and device_type == "cpu":
        return "flex attention has no backward on CPU"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    module = sys.modules.get(type(decoder).__module__)
    if module is None or not hasattr(module, "create_causal_mask"):
        return f"{type(decoder).__name__} does not build its masks through transformers' masking utilities"
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or getattr(config, "use_sliding_window", False):
        return "it has sliding-window attention layers, which one custom mask cannot describe"
    return None


def choose_layout(requested: str, *models: Any, device_type: str = "cpu") -> tuple[str, str | None]:
    """The layout to run models on a ``device_type`` device (``auto``: packed, the fastest), and a
    one-line notice when it falls back to padded because a model's attention cannot take the mask."""
    wanted = "packed" if requested == "auto" else requested
    if wanted == "padded":
        return wanted, None
    for model in models:
        if model is None:
            continue
        lm = unwrap_causal_lm(model)
        reason = shared_layout_refusal(lm, device_type)
        if reason is not None:
            name = getattr(lm.config, "_name_or_path", "") or type(lm).__name__
            return "padded", f"data.layout: padded instead of {wanted}: {name}: {reason}"
    return wanted, None
