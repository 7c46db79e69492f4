"""Texts far longer than ``data.max_length``: tokenize only the part training keeps.

Tokenizing a 50 MB answer whole takes the Rust tokenizer about 6 GB and minutes, to keep its first
``data.max_length`` tokens. So a text record (prompt and answers as strings) holding a text over
:func:`long_text` characters is tokenized from windows instead: each over-long text cut to about
``chars`` characters, an answer keeping its start and a prompt its end, as truncation does (SFT
keeps every text's start). A cut falls only at a single space between two other characters
(:data:`SAFE_CUT`), never inside a word or a run of one character. Conversations are never cut: a
chat template may read a whole message (Qwen3 and DeepSeek-R1 split an answer at ``</think>``).

The record goes through the usual tokenization and truncation twice, at ``chars`` and at
``2 * chars``. The ids are taken when both keep the same ids and the cut text's window alone is
longer in tokens than what truncation keeps of it (so the cut falls past the kept tokens, not
inside them). Otherwise the window doubles, up to the whole text, where the ids are the usual ones
by construction. What this takes on trust: that past a safe cut, characters thousands of
characters away do not change the kept tokens; the doubling checks it for each record
(``tests/test_data_window.py`` compares against the whole text for byte-level BPE,
SentencePiece-style BPE, WordPiece and Unigram, and pins the cases a naive window gets wrong).

A windowed record's token counts (the report's lengths) count its windows: lower bounds. The
report says how many records were windowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..config import DataConfig
from .records import Text
from .report import Findings

if TYPE_CHECKING:
    from .tokenize import Encoder

Keep = Literal["head", "tail"]

__all__ = [
    "Judge",
    "Trial",
    "completions",
    "cut",
    "cut_text",
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


def longest(texts: list[Text]) -> int:
    """The longest string of a text record; 0 when any of ``texts`` is messages: a chat template
    may read a whole message (Qwen3 and DeepSeek-R1 split an answer at ``</think>``), so a
    conversation is always tokenized whole."""
    if not all(isinstance(t, str) for t in texts):
        return 0
    return max((len(t) for t in texts), default=0)


SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")
"""A single space between two other characters: where byte-level BPE's, WordPiece's and
Metaspace's pre-tokenizers all split, so the tokens on each side do not depend on the other.
A cut inside a word or a run of one character (whose tokens can depend on the run's length)
would not be safe."""


def cut(text: str, chars: int, keep: Keep) -> str:
    """``text`` cut to at most its first (``head``) or last (``tail``) ``chars`` characters, at a
    safe point (:data:`SAFE_CUT`): a head ends before the space, a tail starts with it. ``text``
    itself when it is no longer, or when no safe point lies within those characters."""
    if len(text) <= chars:
        return text
    if keep == "head":
        points = [m.start() for m in SAFE_CUT.finditer(text, 0, chars + 1)]
        return text[: points[-1]] if points else text
    found = SAFE_CUT.search(text, len(text) - chars)  # the lookbehind sees the character before
    return text[found.start() :] if found else text


def tokens_at_cut(encode: Callable[[str], list[int]], text: Text, chars: int, keep: Keep) -> int | None:
    """Tokens of the window of ``text`` next to what truncation keeps; None: ``text`` is not cut."""
    if not isinstance(text, str):
        return None
    window = cut(text, chars, keep)
    return None if window is text or len(window) == len(text) else len(encode(window))


def cut_text(text: Text, chars: int, keep: Keep) -> Text:
    return cut(text, chars, keep) if isinstance(text, str) else text


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
    cut: frozenset[str] = frozenset()
    """What was cut: ``prompt``, ``answers`` (nothing: the trial is the usual tokenization)."""


def settle(run: Callable[[int], Trial], longest_text: int, chars: int) -> Trial:
    """The trial to take (see the module's docstring).

    ``run(chars)`` tokenizes the record with its texts cut to ``chars`` characters (a window as
    long as the text leaves it whole, so the last trial is the usual tokenization)."""
    previous = run(chars)
    while chars < longest_text:
        chars *= 2
        current = run(chars)
        if chars >= longest_text or (previous.settled and current.kept == previous.kept):
            return current
        previous = current
    return previous


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
) -> tuple[list[int], list[list[int]], frozenset[str]]:
    """:meth:`Encoder.completions`, from windows when a text is over :func:`long_text`; and what
    was cut (``prompt``, ``answers``: the lengths then count windows)."""
    limit = long_text(encoder.cfg.max_length)
    size = longest([prompt, *answers])
    if limit is None or size <= limit:
        prompt_ids, ids = encoder.completions(prompt, answers, kwargs, where, fields)
        return prompt_ids, ids, frozenset()
    if prompt_keeps == "tail":
        _start_rules(encoder, prompt, where)
    rule = judge(encoder.cfg)

    def alone(text: str) -> list[int]:
        return encoder.encode(text, special=False)

    def run(chars: int) -> Trial:
        findings, encoder.findings = encoder.findings, Findings()
        try:
            prompt_ids, ids = encoder.completions(
                cut_text(prompt, chars, prompt_keeps),
                [cut_text(a, chars, "head") for a in answers],
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
        parts = {"prompt"} if prompt_cut is not None else set()
        parts |= {"answers"} if any(n is not None for n in cuts) else set()
        return Trial((prompt_ids, ids), kept, settled, trial_findings, frozenset(parts))

    trial = settle(run, size, first_window(size_of(encoder.cfg)))
    replay(trial.findings, encoder.findings, where)
    prompt_ids, ids = trial.result
    return prompt_ids, ids, trial.cut


def _start_rules(encoder: Encoder, text: Text, where: str) -> None:
    """A window of a text's end does not show its start: the rules on it (``data.double_bos``) are
    applied to the start of the whole text."""
    if isinstance(text, str):
        encoder.text_ids(text[:1024], where, encoder.cfg.prompt_field)


def _start_of(ids: list[int], mask: list[int], max_length: int) -> tuple[list[int], list[int]]:
    return ids[:max_length], mask[:max_length]


def sequence(
    encoder: Encoder, text: str, tokenize: Callable[[str], tuple[list[int], list[int]]], where: str
) -> tuple[list[int], list[int], bool]:
    """``tokenize(text)`` (a whole sequence's ``(ids, mask)``, cut at ``data.max_length`` keeping
    its start), from windows when ``text`` is over :func:`long_text`: SFT's plain texts."""
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
        # The kept tokens end before the window does.
        first_cut = tokens_at_cut(lambda s: encoder.encode(s, special=False), text, chars, "head")
        settled = first_cut is None or first_cut > max_length
        parts = frozenset() if first_cut is None else frozenset({"text"})
        return Trial((ids, mask), _start_of(ids, mask, max_length), settled, trial_findings, parts)

    trial = settle(run, size, first_window(size_of(encoder.cfg)))
    replay(trial.findings, encoder.findings, where)
    ids, mask = trial.result
    return ids, mask, bool(trial.cut)


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
    _start_rules(encoder, text, where)

    def run(chars: int) -> Trial:
        findings, encoder.findings = encoder.findings, Findings()
        try:
            ids = _prompt_end(
                encoder.prompt_ids(cut_text(text, chars, "tail"), kwargs, where, cfg.prompt_field),
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

    trial = settle(run, size, first_window(size_of(cfg)))
    replay(trial.findings, encoder.findings, where)
    ids: list[int] = trial.result
    return ids
