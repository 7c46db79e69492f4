"""Records -> validated :class:`PreferenceExample` objects: fields, types, messages, encodings,
implicit prompts, two responses and a label (SHP), scores (UltraFeedback), the per-record
``tools`` and ``chat_template_kwargs``. Every problem is a :class:`DataError` naming ``file:line``
and the field; what a policy decides (empty completions, identical pairs) is flagged on the
example, and the scan applies the policy."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import DataError, json_problem

Message = dict[str, Any]
Text = str | list[Message]


@dataclass
class PreferenceExample:
    """One validated preference pair. ``where`` is ``file:line`` or ``dataset row N``."""

    prompt: Text
    chosen: Text
    rejected: Text
    where: str
    margin: float = 0.0
    """How much better chosen is than rejected (reward models' optional margin column)."""
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    """The record's ``tools`` and ``chat_template_kwargs``, passed to the chat template as TRL does."""
    fields: tuple[str, str] = ("chosen", "rejected")
    """The fields chosen and rejected came from, for messages (SHP's responses have their own)."""
    empty: tuple[str, ...] = ()
    """Fields whose completion is empty; ``data.empty_completions`` decides what happens."""
    identical: bool = False
    """Chosen equals rejected as given; ``data.identical_pairs`` decides what happens."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


class NoPreference(DataError):
    """Two responses and nothing that prefers one (a tie, an unknown label): dropped and counted."""


ROLES = ("system", "user", "assistant", "tool", "developer")
SURROGATE = re.compile("[\ud800-\udfff]")
"""JSON may spell half of a UTF-16 pair (``"\\ud83d"``); such text cannot be encoded, and the
tokenizer would fail on it with no ``file:line``."""


def check_string(value: str, where: str, name: str) -> str:
    bad = SURROGATE.search(value)
    if bad:
        raise DataError(
            f"{where}: field '{name}' holds half of a UTF-16 surrogate pair ({bad.group()!a} at character "
            f"{bad.start()}), which is not text; was an emoji cut in two when the file was written?"
        )
    return value


def check_text(value: Any, where: str, name: str) -> Text:
    """A field is a string or a list of {"role", "content"} messages, each valid Unicode."""
    if isinstance(value, str):
        return check_string(value, where, name)
    if isinstance(value, list):
        for i, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(
                    f"{where}: field '{name}' message {i} must be an object with 'role' and 'content'"
                )
            if not isinstance(message["content"], str):
                raise DataError(f"{where}: field '{name}' message {i} 'content' must be a string")
            check_string(message["content"], where, f"{name}' message {i} 'content")
            if message["role"] not in ROLES:
                hint = (
                    " (ShareGPT's human/gpt: map them to user/assistant)"
                    if message["role"] in ("human", "gpt")
                    else ""
                )
                raise DataError(
                    f"{where}: field '{name}' message {i} has role {message['role']!r}; "
                    f"expected one of {', '.join(ROLES)}{hint}"
                )
        return value
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: field '{name}' must be a string or a list of messages, got {kind}")


PROMPT_ENDS = ("user", "tool")
"""The turns a prompt may end with: the model answers a user, or goes on after a tool's result."""
COMPLETION_ROLES = ("assistant", "tool")
"""The turns a completion may hold: the model's own, and the results of the tools it called."""


def check_turns(prompt: Text | None, prompt_field: str, completions: dict[str, Text], where: str) -> None:
    """The one rule for messages, in every command: a completion holds the model's turns (it starts
    with an assistant turn; tool results may follow its tool calls), and a prompt ends where the
    model's answer starts, with a user or tool turn. A system or user turn inside a completion
    would be trained as the model's own words; a prompt ending with an assistant turn would have
    the model answer itself."""
    if isinstance(prompt, list) and prompt and prompt[-1]["role"] not in PROMPT_ENDS:
        role = prompt[-1]["role"]
        article = "an" if role == "assistant" else "a"
        raise DataError(
            f"{where}: field '{prompt_field}' ends with {article} {role} turn (message {len(prompt) - 1}); a prompt "
            "ends where the model's answer starts, with a user or tool turn (move the "
            f"{role} turn {'into the completions' if role == 'assistant' else 'before the last user turn'})"
        )
    for name, completion in completions.items():
        if not isinstance(completion, list):
            continue
        for i, message in enumerate(completion):
            allowed = ("assistant",) if i == 0 else COMPLETION_ROLES
            if message["role"] not in allowed:
                raise DataError(
                    f"{where}: field '{name}' message {i} has role {message['role']!r}; a completion holds the "
                    "model's turns only: it starts with an assistant turn, and tool turns may follow its tool "
                    f"calls (a {message['role']} turn belongs in '{prompt_field}')"
                )


def is_empty(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not m["content"].strip() and not m.get("tool_calls") for m in value)


TEMPLATE_ARGUMENTS = ("conversation", "tools", "add_generation_prompt", "tokenize", "chat_template")
"""Arguments preftune passes to ``apply_chat_template`` itself; a record cannot set them."""


def template_kwargs(record: dict[str, Any], where: str) -> dict[str, Any]:
    """The record's ``tools`` (a list of schemas, or its JSON text) and ``chat_template_kwargs``
    (an object), as TRL passes them to the chat template. ``tools`` is passed only when the record
    has it: some templates fail on ``tools=None``."""
    out: dict[str, Any] = {}
    tools = _json_field(record, "tools", where)
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError(
                f"{where}: field 'tools' must be a list of tool schemas (objects), got {_kind(tools)}"
            )
        out["tools"] = tools
    extra = _json_field(record, "chat_template_kwargs", where)
    if extra is not None:
        if not isinstance(extra, dict):
            raise DataError(f"{where}: field 'chat_template_kwargs' must be an object, got {_kind(extra)}")
        taken = sorted(set(extra) & set(TEMPLATE_ARGUMENTS))
        if taken:
            raise DataError(
                f"{where}: field 'chat_template_kwargs' sets {', '.join(taken)}, which preftune passes itself"
            )
        out.update(extra)
    return out


def _json_field(record: dict[str, Any], name: str, where: str) -> Any:
    value = record.get(name)
    if isinstance(value, str):  # CSV cells and some hub datasets keep JSON as text
        if not value.strip():
            return None
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: field '{name}' is not valid JSON ({json_problem(err)})") from None
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


TURN_MARKER = re.compile(
    r"\n\n(?:Human|Assistant):"  # Anthropic HH-RLHF
    r"|<\|im_start\|>[a-z_]+\n"  # ChatML: Qwen, Yi, …
    r"|<\|start_header_id\|>[a-z_]+<\|end_header_id\|>\n\n"  # Llama 3
    r"|<start_of_turn>[a-z_]+\n"  # Gemma
    r"|\[/?INST\]"  # Llama 2, Mistral
    r"|<｜(?:User|Assistant)｜>"  # DeepSeek
    r"|<\|im_(?:system|user|assistant)\|>[a-z_]*<\|im_middle\|>"  # Kimi
    r"|<\|(?:system|user|assistant|observation)\|>\n?"  # GLM, Phi, Zephyr
)
"""Where a turn starts in a conversation already written out as text."""


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Shared prefix of chosen and rejected becomes the prompt (as TRL's ``extract_prompt``).

    For strings a trailing space stays with the completions, so ``"Q: hi A: yes"`` /
    ``"Q: hi A: no"`` gives prompt ``"Q: hi A:"`` and completions ``" yes"`` / ``" no"``.

    Text written as turns (HH-RLHF's ``"\\n\\nHuman: … \\n\\nAssistant: …"``, chat-template
    markers) is cut at the end of the last turn marker the two share, as the DPO paper's own code
    cuts HH-RLHF at its last ``"\\n\\nAssistant:"``: the answer's shared first words stay in the
    completions, and a final turn left empty is an empty completion rather than a reason to move
    the cut back into the prompt.
    """
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    if isinstance(chosen, str):
        turn = None
        for turn_match in TURN_MARKER.finditer(chosen, 0, shared):
            turn = turn_match.end()
        if turn is not None:
            return chosen[:turn], chosen[turn:], rejected[turn:]
    if isinstance(chosen, str) and 0 < shared < len(chosen) and chosen[shared - 1] == " ":
        shared -= 1
    if isinstance(chosen, str) and shared in (len(chosen), len(rejected)):
        # One text is a prefix of the other ("A: yes" / "A: yes, really"): TRL would leave an
        # empty completion; back off to the last space so both keep a whole word.
        shared = max(chosen.rfind(" ", 0, shared), 0)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def check_number(value: Any, where: str, name: str) -> float:
    """A finite number (CSV cells arrive as text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataError(f"{where}: field '{name}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    return float(value)


def _require(record: dict[str, Any], names: list[str] | tuple[str, ...], where: str) -> None:
    for name in names:
        if name not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{where}: missing field '{name}' (fields present: {have})")


def label_text(value: Any) -> str:
    """A label as the config writes it: ``true``/``false``, ``1`` for 1 and 1.0, text as is."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def responses(
    record: dict[str, Any], where: str, cfg: DataConfig
) -> tuple[Any, Any, tuple[str, str], tuple[float, float] | None]:
    """``(chosen, rejected, their field names, their scores)`` as the record gives them: the
    ``chosen``/``rejected`` fields, or two responses (``data.response_fields``) of which a label
    (``data.preference_field``) or the higher score (``data.score_fields``) picks the chosen one."""
    scores = None
    if not cfg.response_fields:
        _require(record, (cfg.chosen_field, cfg.rejected_field), where)
        if cfg.score_fields:
            _require(record, cfg.score_fields, where)
            a, b = (check_number(record[name], where, name) for name in cfg.score_fields)
            scores = (a, b)
        names = (cfg.chosen_field, cfg.rejected_field)
        return record[names[0]], record[names[1]], names, scores
    first, second = cfg.response_fields
    _require(record, (first, second), where)
    if cfg.score_fields:
        _require(record, cfg.score_fields, where)
        a, b = (check_number(record[name], where, name) for name in cfg.score_fields)
        scores = (a, b)
    if cfg.preference_field:
        _require(record, (cfg.preference_field,), where)
        label = label_text(record[cfg.preference_field])
        first_value, second_value = cfg.preference_values
        if label not in (first_value, second_value):
            raise NoPreference(
                f"{where}: field '{cfg.preference_field}' is {label!r}: neither {first_value!r} ('{first}' "
                f"preferred) nor {second_value!r} ('{second}' preferred)"
            )
        first_wins = label == first_value
    else:
        assert scores is not None  # check_data: response_fields need preference_field or score_fields
        if scores[0] == scores[1]:
            raise NoPreference(
                f"{where}: fields '{cfg.score_fields[0]}' and '{cfg.score_fields[1]}' are equal ({scores[0]:g})"  # type: ignore[index]
            )
        first_wins = scores[0] > scores[1]
    if first_wins:
        return record[first], record[second], (first, second), scores
    return record[second], record[first], (second, first), scores and (scores[1], scores[0])


def parse_example(
    record: dict[str, Any], where: str, cfg: DataConfig, margin_field: str | None = None
) -> PreferenceExample:
    """Validate one record and bring it to the :class:`PreferenceExample` shape.

    ``margin_field`` names an optional numeric column kept as :attr:`PreferenceExample.margin`;
    ``scores`` takes the difference of ``data.score_fields`` (chosen's minus rejected's).
    """
    chosen_raw, rejected_raw, names, scores = responses(record, where, cfg)
    chosen = check_text(chosen_raw, where, names[0])
    rejected = check_text(rejected_raw, where, names[1])
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(
            f"{where}: fields '{names[0]}' and '{names[1]}' mix text and messages; use one format"
        )
    kwargs = template_kwargs(record, where)
    margin = _margin(record, where, margin_field, scores)
    identical = not is_empty(chosen) and chosen == rejected
    given = record.get(cfg.prompt_field)
    if identical and given is None:  # no completion would be left to train: the scan drops it
        return PreferenceExample(chosen[:0], chosen, rejected, where, margin, kwargs, names, (), True)
    # UltraFeedback's layout: a text prompt beside conversations that already hold it; as TRL
    # does, the prompt is then the conversations' shared prefix.
    text_beside_conversations = isinstance(given, str) and isinstance(chosen, list)
    if text_beside_conversations and is_empty(split_implicit_prompt(chosen, rejected)[0]):
        text_beside_conversations = False  # the conversations hold no prompt: a real mix, refused below
    if given is not None and not text_beside_conversations:
        prompt = check_text(given, where, cfg.prompt_field)
        if isinstance(prompt, str) != isinstance(chosen, str):
            raise DataError(
                f"{where}: field '{cfg.prompt_field}' and field '{names[0]}' mix text and messages; use one format"
            )
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if is_empty(prompt):
            raise DataError(
                f"{where}: no field '{cfg.prompt_field}' and fields '{names[0]}'/'{names[1]}' "
                "share no prefix to use as the prompt"
            )
    check_turns(prompt, cfg.prompt_field, {names[0]: chosen, names[1]: rejected}, where)
    empty = tuple(name for name, value in zip(names, (chosen, rejected), strict=True) if is_empty(value))
    return PreferenceExample(prompt, chosen, rejected, where, margin, kwargs, names, empty, identical)


def _margin(
    record: dict[str, Any], where: str, margin_field: str | None, scores: tuple[float, float] | None
) -> float:
    if margin_field == "scores":
        return scores[0] - scores[1] if scores else 0.0
    if margin_field and record.get(margin_field) not in (None, ""):
        return check_number(record[margin_field], where, margin_field)
    return 0.0
