"""Preference records -> validated examples -> token ids.

Record shapes accepted, with configurable field names (``docs/data.md`` lists them with the public
sets they fit):

* standard:       {"prompt": str, "chosen": str, "rejected": str}
* conversational: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
* implicit prompt (HH-RLHF style): only "chosen" and "rejected", each a full text or
  conversation; their shared prefix is the prompt, cut at the last turn marker they share.
* a text prompt beside conversations that hold it (UltraFeedback), with two score fields;
* two responses and a label or two scores (SHP): ``data.response_fields`` and
  ``data.preference_field`` / ``data.score_fields``.

A record's ``tools`` and ``chat_template_kwargs`` reach the chat template, as TRL passes them.

Unpaired records for KTO, ``{"prompt", "completion", "label"}``, and pairs unpaired for it:
:mod:`.unpaired`.

Tokenization follows TRL 1.x exactly, so that the same records give the same ids:
the prompt is tokenized with the tokenizer's special tokens, prompt + completion
(+ EOS text for standard records) is tokenized as one string, and the completion is
what follows the longest common prefix of the two. For conversational records the
prompt is the chat template with ``add_generation_prompt=True`` and the completion
is the rest of the templated full conversation.

Every problem with the input is raised as :class:`DataError`, whose message starts
with ``file:line`` (or ``dataset row N``) and names the field. Every source is read by one
:class:`~.scan.Scan` (records -> check -> collect up to ``max_errors`` -> report), and every
rule's outcome is counted in the report's findings (:class:`~.report.Findings`).
"""

from ..errors import DataError
from .prepare import prepare_pairs, scan
from .readers import read_records
from .records import ROLES, Message, PreferenceExample, Text, parse_example, split_implicit_prompt
from .report import DataReport, Findings
from .scan import Scan
from .tokenize import (
    Encoder,
    TokenizedPair,
    check_tokenizer,
    sequence_ids,
    tokenize_example,
    truncate,
    with_eos,
)
from .unpaired import TokenizedUnpaired, UnpairedReport, prepare_unpaired, scan_unpaired

__all__ = [
    "ROLES",
    "DataError",
    "DataReport",
    "Encoder",
    "Findings",
    "Message",
    "PreferenceExample",
    "Scan",
    "Text",
    "TokenizedPair",
    "TokenizedUnpaired",
    "UnpairedReport",
    "check_tokenizer",
    "parse_example",
    "prepare_pairs",
    "prepare_unpaired",
    "read_records",
    "scan",
    "scan_unpaired",
    "sequence_ids",
    "split_implicit_prompt",
    "tokenize_example",
    "truncate",
    "with_eos",
]
