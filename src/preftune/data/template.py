"""A tokenizer's chat template, rendered and checked rather than trusted.

Real templates break the "prompt + completion" picture a trainer relies on: a generation prompt
the whole conversation lacks (DeepSeek-R1-Distill's ``<think>\\n``), reasoning removed from the
answer (R1-Distill, Nemotron-Super), text the data never had (Qwen3's empty think block, GLM-4.5's
``\\n<think></think>\\n``), no stop token at the end (GLM-4.5), errors raised from Jinja (Gemma-2
and Mistral refuse a system message). :class:`ChatTemplate` renders once per sequence, as
``apply_chat_template(tokenize=True)`` would (the rendered text tokenized without special tokens),
so the text-level checks cost string comparisons, not extra renders.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import DataError
from .records import Message
from .report import shown

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
"""transformers' marker of assistant text (``return_assistant_tokens_mask``)."""
LEADING_TAG = re.compile(r"\s*(<[^<>\s]+>)")


class ChatTemplate:
    """Render messages, tokenize the text, and find the assistant spans where the template marks them."""

    def __init__(self, tokenizer: Any, encode: Callable[[str], list[int]] | None = None):
        self.tokenizer = tokenizer
        self._encode = encode
        template = tokenizer.chat_template
        text = " ".join(template.values()) if isinstance(template, dict) else template or ""
        self.masks = bool(GENERATION_BLOCK.search(text))
        """The template marks assistant text with ``{% generation %}``: its mask is the exact
        completion boundary."""
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.stops = special | {tokenizer.eos_token_id}
        """EOS, or a special token such as an end-of-turn marker (``<|im_end|>``, ``<end_of_turn>``)."""

    def render(
        self, messages: list[Message], kwargs: dict[str, Any], where: str, generation: bool = False
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation, **kwargs
            )
        except Exception as err:  # Jinja's errors, and whatever a template's own code raises
            raise DataError(f"{where}: the chat template refused the messages: {_reason(err)}") from None

    def ids(self, text: str) -> list[int]:
        """Token ids of rendered text, as ``apply_chat_template(tokenize=True)`` makes them."""
        if self._encode is not None:
            return self._encode(text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def masked(
        self, messages: list[Message], kwargs: dict[str, Any], where: str, turn: int
    ) -> tuple[list[int], list[int], int | None]:
        """Ids, the template's assistant mask, and where assistant turn number ``turn`` starts
        (None when the template marks fewer turns)."""
        try:
            out = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
            )
        except Exception as err:
            raise DataError(f"{where}: the chat template refused the messages: {_reason(err)}") from None
        mask = list(out["assistant_masks"])
        starts = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
        return list(out["input_ids"]), mask, starts[turn] if turn < len(starts) else None

    def ends_in_stop(self, ids: list[int]) -> bool:
        """The last token that is not whitespace is EOS or a special token."""
        for token in reversed(ids):
            if token in self.stops:
                return True
            if self.tokenizer.decode([token]).strip():
                return False
        return False


def _reason(err: Exception) -> str:
    from jinja2 import TemplateError

    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, TemplateError) and type(err).__name__ == "TemplateError":
        return text  # the template's own raise_exception: its message is the reason
    return f"{text} ({type(err).__name__})" if text else type(err).__name__


def common_text_length(text: str, other: str) -> int:
    length = 0
    for a, b in zip(text, other, strict=False):
        if a != b:
            break
        length += 1
    return length


def find_squashed(text: str, part: str) -> int | None:
    """Where ``part`` starts in ``text`` when whitespace is ignored (templates trim and re-space
    answers), as an index into ``text``; None when it is not there."""
    kept = [i for i, c in enumerate(text) if not c.isspace()]
    needle = "".join(part.split())
    if not needle:
        return None
    at = "".join(text[i] for i in kept).find(needle)
    return None if at < 0 else kept[at]


def answer_findings(
    prompt_text: str, completion_text: str, completion: list[Message]
) -> list[tuple[str, str]]:
    """What the template did to the final assistant message: ``[(rule, evidence)]`` for text it
    dropped (``stripped_content``) and text it added before the answer (``added_text``)."""
    finals = [m for m in completion if m["role"] == "assistant" and m["content"].strip()]
    if not finals:
        return []
    answer = finals[-1]["content"]
    found: list[tuple[str, str]] = []
    at = find_squashed(completion_text, answer)
    if at is None:
        # Reasoning models cut the answer at </think>: name what went, keep looking for the rest.
        tail = answer.rsplit("</think>", 1)[1] if "</think>" in answer else ""
        at = find_squashed(completion_text, tail) if tail.strip() else None
        dropped = answer[: len(answer) - len(tail)] if at is not None else answer
        found.append(("stripped_content", f"{shown(dropped.strip())} is not in the rendered completion"))
    single = len(completion) == 1
    if single and at is not None and completion_text[:at].strip():
        found.append(("added_text", f"{shown(completion_text[:at])} is added before the answer"))
    tag = LEADING_TAG.match(answer)
    opened = tag is not None and completion_text.lstrip().startswith(tag.group(1))
    if single and tag and opened and prompt_text.rstrip().endswith(tag.group(1)):
        found.append(
            ("added_text", f"the generation prompt ends with {tag.group(1)!r} and the answer opens it again")
        )
    return found
