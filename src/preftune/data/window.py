"""Texts far longer than ``data.max_length``: tokenize only the part training keeps.

Tokenizing a 50 MB answer whole takes the Rust tokenizer about 6 GB and minutes, to keep its first
``data.max_length`` tokens. So a record holding a text over :func:`long_text` characters is
tokenized from windows instead: each over-long text is cut to ``chars`` characters, a completion
keeping its start and a prompt its end, as truncation does (SFT keeps every text's start). Each
message's content is cut on its own.

The record then goes through the usual tokenization and truncation twice, at ``chars`` and at
``2 * chars``. The ids are taken when both keep the same ids and the first cut text alone is
longer in tokens than what truncation keeps of it (so the cut falls past the kept tokens, not
inside them). Otherwise the window doubles, up to the whole text, where the ids are the usual ones
by construction. What this takes on trust: that what a tokenizer makes of characters thousands of
characters away does not change the kept tokens. Pre-tokenizer splits and BPE merges are local;
the doubling checks it for each record (``tests/test_data_window.py`` compares against the whole
text for byte-level BPE, SentencePiece-style BPE, WordPiece, Unigram and chat templates).

A windowed record's token counts (the report's lengths) count its windows: lower bounds. The
report says how many records were windowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..config import DataConfig
from .records import Message, Text
from .report import Findings

if TYPE_CHECKING:
    from .tokenize import Encoder

Keep = Literal["head", "tail"]

__all__ = [
    "Judge",
    "Trial",
    "completions",
    "cut",
    "first_window",
    "long_text",
    "longest",
    "pair_judge",
    "prompt",
    "sequence",
    "sequence_judge",
    "settle",
    "tokens_at_cut",
]


def first_window(max_length: int) -> int:
    """Characters of the first window: 16 per token of ``max_length``, room for its tokens (and a
    prompt's) at up to 8 characters a token."""
    return max(16 * max_length, 1024)


def long_text(max_length: int | None) -> int | None:
    """A record with a text longer than this (characters) is tokenized from windows; None:
    never (no ``max_length``, so every token is kept)."""
    return None if max_length is None else 4 * first_window(max_length)


def size_of(cfg: DataConfig) -> int:
    assert cfg.max_length is not None
    return cfg.max_length


def _content_length(message: Message) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def longest(texts: list[Text]) -> int:
    """The longest text among ``texts`` (a message's content counts on its own)."""
    sizes = [len(t) if isinstance(t, str) else max((_content_length(m) for m in t), default=0) for t in texts]
    return max(sizes, default=0)


def _cut_string(text: str, chars: int, keep: Keep) -> str:
    if len(text) <= chars:
        return text
    return text[:chars] if keep == "head" else text[len(text) - chars :]


def _cut_message(message: Message, chars: int, keep: Keep) -> Message:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": _cut_string(content, chars, keep)}
    if isinstance(content, list):
        parts = [
            {**part, "text": _cut_string(part["text"], chars, keep)}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
        return {**message, "content": parts}
    return message


def cut(text: Text, chars: int, keep: Keep) -> Text:
    """``text`` with every string (a message's content) over ``chars`` characters cut to its
    first (``head``) or last (``tail``) ``chars``."""
    if isinstance(text, str):
        return _cut_string(text, chars, keep)
    return [_cut_message(m, chars, keep) for m in text]


def _cut_strings(text: Text, chars: int) -> list[str]:
    """The strings of ``text`` that :func:`cut` shortens, in order."""
    if isinstance(text, str):
        return [text] if len(text) > chars else []
    out = []
    for m in text:
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"text": content}]
        out += [
            p["text"]
            for p in parts
            if isinstance(p, dict) and isinstance(p.get("text"), str) and len(p["text"]) > chars
        ]
    return out


def tokens_at_cut(encode: Callable[[str], list[int]], text: Text, chars: int, keep: Keep) -> int | None:
    """Tokens in the window of the text :func:`cut` shortens next to what truncation keeps: the
    first cut string for ``head``, the last for ``tail``; None: nothing in ``text`` is cut."""
    strings = _cut_strings(text, chars)
    if not strings:
        return None
    string = strings[0] if keep == "head" else strings[-1]
    return len(encode(_cut_string(string, chars, keep)))


@dataclass
class Trial:
    """One tokenization of a record from windows of ``chars`` characters."""

    result: Any
    """What the caller goes on with (ids before truncation)."""
    kept: Any
    """What truncation keeps of it: compared between windows."""
    settled: bool
    """Every cut fell past the tokens truncation keeps."""
    findings: Findings


def settle(run: Callable[[int], Trial], longest_text: int, chars: int) -> tuple[Trial, bool]:
    """The trial to take (see the module's docstring) and whether any text was cut in it.

    ``run(chars)`` tokenizes the record with its texts cut to ``chars`` characters (a window as
    long as the text leaves it whole, so the last trial is the usual tokenization)."""
    previous = run(chars)
    while chars < longest_text:
        chars *= 2
        current = run(chars)
        if chars >= longest_text:
            return current, False
        if previous.settled and current.kept == previous.kept:
            return current, True
        previous = current
    return previous, False


def replay(findings: Findings, into: Findings, where: str) -> None:
    """The notes of the trial taken, made in the run's findings (a record counts once per rule)."""
    for finding in findings.by_rule.values():
        into.note(finding.rule, finding.setting, where, finding.example)


Judge = Callable[[list[int], list[list[int]], int | None, list[int | None]], tuple[Any, bool]]
"""``(prompt_ids, completion_ids, prompt tokens at its cut, each completion's) -> (kept, settled)``."""


def pair_judge(cfg: DataConfig) -> Judge:
    """What the pairs' (and KTO's) truncation keeps: a prompt's end within ``max_prompt_length``,
    then each completion's start within ``max_length``; a prompt that fills ``max_length`` drops
    the record (settled: a longer prompt fills it too)."""
    assert cfg.max_length is not None
    max_length, max_prompt = cfg.max_length, cfg.max_prompt_length

    def judge(
        prompt_ids: list[int], completion_ids: list[list[int]], prompt_cut: int | None, cuts: list[int | None]
    ) -> tuple[Any, bool]:
        prompt = (
            prompt_ids[-max_prompt:]
            if max_prompt is not None and len(prompt_ids) > max_prompt
            else prompt_ids
        )
        if len(prompt) >= max_length:
            return None, True
        room = max_length - len(prompt)
        settled = prompt_cut is None or (max_prompt is not None and prompt_cut > max_prompt)
        settled = settled and all(n is None or n > room for n in cuts)
        return (prompt, [ids[:room] for ids in completion_ids]), settled

    return judge


def sequence_judge(cfg: DataConfig) -> Judge:
    """What SFT's truncation keeps: the start of ``prompt + completion`` within ``max_length``
    (and where the completion starts, for the loss mask)."""
    assert cfg.max_length is not None
    max_length = cfg.max_length

    def judge(
        prompt_ids: list[int], completion_ids: list[list[int]], prompt_cut: int | None, cuts: list[int | None]
    ) -> tuple[Any, bool]:
        ids = prompt_ids + completion_ids[0]
        kept = (ids[:max_length], min(len(prompt_ids), max_length))
        if prompt_cut is not None:
            return kept, prompt_cut > max_length
        return kept, cuts[0] is None or len(prompt_ids) + cuts[0] > max_length

    return judge


def completions(
    encoder: Encoder,
    prompt: Text,
    answers: list[Text],
    kwargs: dict[str, Any],
    where: str,
    fields: tuple[str, ...],
    judge: Callable[[DataConfig], Judge],
    prompt_keeps: Keep = "tail",
) -> tuple[list[int], list[list[int]], bool]:
    """:meth:`Encoder.completions`, from windows when a text is over :func:`long_text`; the bool
    says whether a text was cut (the lengths then count windows)."""
    limit = long_text(encoder.cfg.max_length)
    size = longest([prompt, *answers])
    if limit is None or size <= limit:
        prompt_ids, ids = encoder.completions(prompt, answers, kwargs, where, fields)
        return prompt_ids, ids, False

    rule = judge(encoder.cfg)

    def alone(text: str) -> list[int]:
        return encoder.encode(text, special=False)

    def run(chars: int) -> Trial:
        findings, encoder.findings = encoder.findings, Findings()
        try:
            prompt_ids, ids = encoder.completions(
                cut(prompt, chars, prompt_keeps),
                [cut(a, chars, "head") for a in answers],
                kwargs,
                where,
                fields,
            )
            trial_findings = encoder.findings
        finally:
            encoder.findings = findings
        prompt_cut = tokens_at_cut(alone, prompt, chars, prompt_keeps)
        cuts = [tokens_at_cut(alone, a, chars, "head") for a in answers]
        kept, settled = rule(prompt_ids, ids, prompt_cut, cuts)
        return Trial((prompt_ids, ids), kept, settled, trial_findings)

    trial, windowed = settle(run, size, first_window(size_of(encoder.cfg)))
    replay(trial.findings, encoder.findings, where)
    prompt_ids, ids = trial.result
    return prompt_ids, ids, windowed


def _start_of(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]]:
    return ids[:max_length], mask[:max_length]


def sequence(
    encoder: Encoder, text: Text, tokenize: Callable[[Text], tuple[list[int], list[int]]], where: str
) -> tuple[list[int], list[int], bool]:
    """``tokenize(text)`` (a whole sequence's ``(ids, mask)``, cut at ``data.max_length`` keeping
    its start), from windows when a string of ``text`` is over :func:`long_text`: SFT's
    conversations and plain texts."""
    limit = long_text(encoder.cfg.max_length)
    size = longest([text])
    if limit is None or size <= limit:
        return (*tokenize(text), False)
    max_length = encoder.cfg.max_length
    assert max_length is not None

    def run(chars: int) -> Trial:
        findings, encoder.findings = encoder.findings, Findings()
        try:
            ids, mask = tokenize(cut(text, chars, "head"))
            trial_findings = encoder.findings
        finally:
            encoder.findings = findings
        # The kept tokens end before the first cut string's window does, wherever it starts.
        first_cut = tokens_at_cut(lambda s: encoder.encode(s, special=False), text, chars, "head")
        settled = first_cut is None or first_cut > max_length
        return Trial((ids, mask), _start_of(ids, mask, max_length), settled, trial_findings)

    trial, windowed = settle(run, size, first_window(size_of(encoder.cfg)))
    replay(trial.findings, encoder.findings, where)
    ids, mask = trial.result
    return ids, mask, windowed


def _prompt_end(ids: list[int], max_prompt: int | None) -> list[int]:
    return ids[len(ids) - max_prompt :] if max_prompt is not None and len(ids) > max_prompt else ids


def prompt(encoder: Encoder, text: Text, kwargs: dict[str, Any], where: str) -> list[int]:
    """A sampling prompt's ids within ``data.max_prompt_length`` (keeping its end), from windows
    when a string of it is over :func:`long_text`. A prompt that fills ``data.max_length`` keeps
    the ids of its window: it cannot train either way (:func:`.prompts.check_room` says so)."""
    cfg = encoder.cfg
    limit = long_text(cfg.max_length)
    size = longest([text])
    if limit is None or size <= limit:
        return _prompt_end(encoder.prompt_ids(text, kwargs, where, cfg.prompt_field), cfg.max_prompt_length)

    def run(chars: int) -> Trial:
        findings, encoder.findings = encoder.findings, Findings()
        try:
            ids = _prompt_end(
                encoder.prompt_ids(cut(text, chars, "tail"), kwargs, where, cfg.prompt_field),
                cfg.max_prompt_length,
            )
            trial_findings = encoder.findings
        finally:
            encoder.findings = findings
        last_cut = tokens_at_cut(lambda s: encoder.encode(s, special=False), text, chars, "tail")
        fills = len(ids) >= size_of(cfg)
        settled = (
            fills
            or last_cut is None
            or (cfg.max_prompt_length is not None and last_cut > cfg.max_prompt_length)
        )
        return Trial(ids, "fills" if fills else ids, settled, trial_findings)

    trial, _ = settle(run, size, first_window(size_of(cfg)))
    replay(trial.findings, encoder.findings, where)
    ids: list[int] = trial.result
    return ids
