"""Reading a reward model's score: the head applied at each sequence's last real token.

transformers' ``*ForSequenceClassification`` finds that token as the last one that is not
``pad_token_id``. That is the source of the two commonest reward-model bugs: a tokenizer
without a pad token (padding with EOS, so the appended EOS counts as padding and the score is
read one token early) and left padding with a model that guesses positions. Here the
position comes from the attention mask and the layout, never from token ids, and position
ids follow the mask, so left and right padding give the same scores as no padding.

The same reading serves the prefix-shared and packed layouts: the backbone runs over
``[prompt | chosen | rejected]`` rows under the layout's mask (:mod:`preftune.model.attention`), and
each score is read at the sequence's ``last_index`` (chosen's last token, rejected's last token),
where the hidden state is the one the sequence's own padded row would give.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .attention import pair_attention_mask


def reward_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The backbone and the one-output head of a sequence-classification model (PEFT-wrapped too)."""
    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if head is None or backbone is None:
        raise TypeError(f"{type(base).__name__} has no reward head ('score' or 'classifier') to read")
    return backbone, head


def last_token_index(attention_mask: Tensor) -> Tensor:
    """``[R]`` flat position of each row's last real token, left or right padded."""
    rows, width = attention_mask.shape
    last_in_row = width - 1 - attention_mask.flip(-1).argmax(dim=-1)
    return torch.arange(rows, device=attention_mask.device) * width + last_in_row


def backbone_hidden(
    backbone: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """``[R·T, H]`` the backbone's last hidden states, flat; rows holding several sequences
    (``segment_ids``) run under the layout's mask (eager attention adds it to scores of the
    weights' dtype)."""
    mask: Any = attention_mask
    if segment_ids is not None:
        dtype = backbone.get_input_embeddings().weight.dtype
        mask = pair_attention_mask(segment_ids, backbone.config, dtype)
    hidden = backbone(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])


def sequence_rewards(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    last_index: Tensor | None = None,
    position_ids: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """``[S]`` rewards: the head at each sequence's last token (``last_index``, flat positions)."""
    backbone, head = reward_parts(model)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if last_index is None:
        last_index = last_token_index(attention_mask)
    hidden = backbone_hidden(backbone, input_ids, attention_mask, position_ids, segment_ids)
    return head(hidden.index_select(0, last_index)).squeeze(-1).float()


class RewardModule(nn.Module):
    """Wraps a reward model so that its forward maps a batch to per-sequence rewards (a module,
    so that data-parallel wrappers see the call as a forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> Tensor:
        return sequence_rewards(
            self.model,
            batch.input_ids,
            batch.attention_mask,
            batch.last_index,
            batch.position_ids,
            batch.segment_ids,
        )


# --------------------------------------------------------------------------- PPO's critic


def token_values(model: nn.Module, batch: Any) -> Tensor:
    """``[N]`` a critic's value of the state before each completion token: the head applied at
    position ``label_index − 1`` (the hidden state the policy predicts that token from), in
    ``batch.label_index`` order. A reward model read there scores every prefix of the completion."""
    backbone, head = reward_parts(model)
    hidden = backbone_hidden(backbone, batch.input_ids, batch.attention_mask, batch.position_ids)
    return head(hidden.index_select(0, batch.label_index - 1)).squeeze(-1).float()


def critic_from_causal_lm(policy: Any) -> nn.Module:
    """A one-output sequence classifier holding a copy of ``policy``'s backbone and a new head set
    to zero: at the start it predicts 0 everywhere instead of noise from a random head."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    critic = AutoModelForSequenceClassification.from_config(config)
    backbone, head = reward_parts(critic)
    backbone.load_state_dict(policy.get_decoder().state_dict())
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()
    return critic.to(next(policy.parameters()).dtype)
