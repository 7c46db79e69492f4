"""Supervised fine-tuning records -> token ids with a loss mask.

Three record shapes, field names configurable (``data.prompt_field``, ``data.completion_field``,
``data.messages_field``, ``data.text_field``):

* ``{"prompt", "completion"}`` (text or messages): the loss covers the completion tokens;
  tokenized as TRL's ``SFTTrainer`` does (text: prompt + completion + EOS text as one string;
  messages: the chat template), the completion starting where prompt and prompt + completion
  diverge.
* ``{"messages": [...]}``: the chat template over the whole conversation; the loss covers the
  assistant turns only: the template's own mask where it marks them (``{% generation %}``), else
  found by rendering each prefix of the conversation (so any template works).
* ``{"text"}``: the loss covers every token (EOS text appended).

``sft.completion_only=false`` puts the loss on every token of every shape. A record's ``tools`` and
``chat_template_kwargs`` reach the template; the data rules (:mod:`.tokenize`) apply as for pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from . import window
from .cache import Job, processes, tokenized
from .readers import Source
from .records import Text, check_string, check_text, check_turns, is_empty, template_kwargs
from .report import Findings, Lengths, p95, windowed_line
from .scan import (
    Chunk,
    ChunkResult,
    Decoded,
    Progress,
    Sink,
    caught_warnings,
    chunks_of,
    decode,
    error_report,
    scan_chunks,
    scan_items,
)
from .store import Examples, Rows, Store
from .tokenize import Encoder, with_eos


@dataclass
class TokenizedSequence:
    """One training sequence: token ids, which of them carry the loss, and where it came from."""

    input_ids: list[int]
    loss_mask: list[int]
    index: int
    where: str = ""

    @property
    def loss_tokens(self) -> int:
        """Tokens whose prediction is trained (the first token has no predecessor)."""
        return sum(self.loss_mask[1:])


@dataclass
class SFTReport:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    windowed: int = 0
    lengths: Lengths = field(default_factory=Lengths, repr=False)
    loss_tokens: Lengths = field(default_factory=Lengths, repr=False)
    findings: Findings = field(default_factory=Findings, repr=False)
    cache: str = ""
    """Where the token ids are kept and whether this run reused them."""

    def summary(self) -> str:
        ordered = np.sort(self.lengths.array()) if len(self.lengths) else np.zeros(1, np.int32)
        line = (
            f"{self.kept}/{self.records} sequences kept; tokens: mean {int(ordered.sum()) / len(ordered):.1f}, "
            f"p95 {p95(ordered)}, max {int(ordered[-1])}; {int(self.loss_tokens.array().sum(dtype=np.int64))} "
            "tokens carry the loss"
        )
        if self.truncated or self.dropped_no_loss:
            line += f"\ntruncated: {self.truncated} (kept their start); dropped: {self.dropped_no_loss} with no loss token left"
        if self.windowed:
            line += "\n" + windowed_line(self.windowed, "records")
        return "\n".join([line, *self.findings.lines(), *([self.cache] if self.cache else [])])


def tokenize_sft(
    tokenizer: Any,
    record: dict[str, Any],
    where: str,
    cfg: DataConfig,
    completion_only: bool,
    encoder: Encoder | None = None,
    report: SFTReport | None = None,
) -> tuple[list[int], list[int]] | None:
    """``(input_ids, loss_mask)`` of one record, or None when ``data.empty_completions=drop`` drops
    it; problems raise :class:`DataError` naming the field. A record with a text too long to
    tokenize whole is tokenized as far as ``data.max_length`` keeps (:mod:`.window`), counted in
    ``report.windowed``."""
    encoder = encoder or Encoder(tokenizer, cfg, Findings())
    report = report or SFTReport()
    kwargs = template_kwargs(record, where)
    prompt_field, completion_field = cfg.prompt_field, cfg.completion_field
    if completion_field in record:
        if prompt_field not in record:
            raise DataError(f"{where}: field '{completion_field}' needs a field '{prompt_field}'")
        prompt = check_text(record[prompt_field], where, prompt_field)
        completion = check_text(record[completion_field], where, completion_field)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DataError(
                f"{where}: fields '{prompt_field}' and '{completion_field}' mix text and messages"
            )
        check_turns(prompt, prompt_field, {completion_field: completion}, where)
        kept = empty_completion(completion, where, completion_field, cfg, encoder.findings)
        if kept is None:
            return None
        prompt_ids, (completion_ids,), cut = window.completions(
            encoder, prompt, [kept], kwargs, where, (completion_field,), window.sequence_judge, "head"
        )
        report.windowed += bool(cut)
        start = len(prompt_ids) if completion_only else 0
        ids = prompt_ids + completion_ids
        return ids, [0] * start + [1] * (len(ids) - start)
    if cfg.messages_field in record:
        messages = check_text(record[cfg.messages_field], where, cfg.messages_field)
        if not isinstance(messages, list) or is_empty(messages):
            raise DataError(f"{where}: field '{cfg.messages_field}' must be a non-empty list of messages")
        ids, mask = encoder.conversation(messages, kwargs, where, cfg.messages_field)  # whole: see .window
        if not completion_only:
            return ids, [1] * len(ids)
        if not any(mask):
            raise DataError(f"{where}: field '{cfg.messages_field}' has no assistant turn to learn from")
        return ids, mask
    if cfg.text_field in record:
        text = record[cfg.text_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field '{cfg.text_field}' must be non-empty text")
        check_string(text, where, cfg.text_field)
        encoder.check(False, where)

        def whole(cut: str) -> tuple[list[int], list[int]]:
            ids = encoder.text_ids(with_eos(tokenizer, cut), where, cfg.text_field)
            return ids, [1] * len(ids)

        ids, mask, windowed = window.sequence(encoder, text, whole, where)
        report.windowed += windowed
        return ids, mask
    have = ", ".join(sorted(map(str, record))) or "none"
    raise DataError(
        f"{where}: expected fields '{prompt_field}' and '{completion_field}', or '{cfg.messages_field}', "
        f"or '{cfg.text_field}' (fields present: {have})"
    )


def empty_completion(
    completion: Text, where: str, field: str, cfg: DataConfig, findings: Findings
) -> Text | None:
    """``data.empty_completions`` on one completion: itself when not empty; None when dropped; an
    EOS-only completion (the template's end of turn for messages) when kept, as TRL trains it."""
    if not is_empty(completion):
        return completion
    policy = cfg.empty_completions
    findings.note("empty_completion", f"data.empty_completions={policy}", where, f"field '{field}'")
    if policy == "error":
        raise DataError(
            f"{where}: field '{field}' is an empty completion (data.empty_completions=error; drop or keep to go on)"
        )
    if policy == "drop":
        return None
    return "" if isinstance(completion, str) else [{"role": "assistant", "content": ""}]


def _sft_check(
    tokenizer: Any, cfg: DataConfig, completion_only: bool, encoder: Encoder, report: SFTReport, rows: Rows
) -> Callable[[int, str, dict[str, Any]], None]:
    def check(index: int, where: str, record: dict[str, Any]) -> None:
        tokenized = tokenize_sft(tokenizer, record, where, cfg, completion_only, encoder, report)
        if tokenized is None:
            return
        ids, mask = tokenized
        report.lengths.append(len(ids))
        if cfg.max_length is not None and len(ids) > cfg.max_length:
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            report.truncated += 1
        loss_tokens = sum(mask[1:])  # the first token has no predecessor
        if loss_tokens == 0:
            report.dropped_no_loss += 1
            return
        report.loss_tokens.append(loss_tokens)
        rows.add((ids,), index, where, mask=mask)
        report.kept += 1

    return check


def _prefetch(tokenizer: Any, encoder: Encoder, items: list[Decoded], cfg: DataConfig) -> None:
    """The texts of the chunk's text records, tokenized in one call (the check tokenizes anything else)."""
    texts: list[str] = []
    for where, record in items:
        if not isinstance(record, dict):
            continue
        try:
            if cfg.completion_field in record and cfg.prompt_field in record:
                prompt = check_text(record[cfg.prompt_field], where, cfg.prompt_field)
                completion = check_text(record[cfg.completion_field], where, cfg.completion_field)
                kept = empty_completion(completion, where, cfg.completion_field, cfg, Findings())
                texts += encoder.texts(prompt, [kept]) if kept is not None else []
            elif cfg.messages_field not in record and isinstance(record.get(cfg.text_field), str):
                texts.append(with_eos(tokenizer, record[cfg.text_field]))
        except DataError:
            continue
    encoder.prefetch(texts)


def sft_work(tokenizer: Any, cfg: DataConfig, completion_only: bool) -> Callable[[Chunk], ChunkResult]:
    """A chunk of records -> its sequences in columns, its report and errors (run in a worker)."""

    def work(chunk: Chunk) -> ChunkResult:
        report, rows = SFTReport(), Rows(1, mask=True)
        encoder = Encoder(tokenizer, cfg, report.findings)
        items = decode(chunk.items)
        if tokenizer.eos_token is not None:
            _prefetch(tokenizer, encoder, items, cfg)
        check = _sft_check(tokenizer, cfg, completion_only, encoder, report, rows)
        counted, caught = caught_warnings(lambda: scan_items(items, chunk.budget, check))
        return ChunkResult(counted, report, rows.arrays(), caught)

    return work


def scan_sft(
    source: Source,
    tokenizer: Any,
    cfg: DataConfig,
    completion_only: bool,
    sink: Sink,
    progress: Progress,
    max_errors: int,
) -> tuple[SFTReport, list[DataError]]:
    report = SFTReport()
    progress.desc = "checking and tokenizing"
    report.records, errors = scan_chunks(
        lambda budget: chunks_of(source.items(), budget),
        sft_work(tokenizer, cfg, completion_only),
        report,
        sink,
        processes(cfg),
        max_errors,
        progress,
    )
    return report, errors


def finish_sft(report: SFTReport, errors: list[DataError], name: str, max_errors: int) -> None:
    if errors:
        raise error_report(name, errors, len(errors) >= max_errors)
    if report.records == 0:
        raise DataError(f"{name}: no records")
    if not report.kept:
        raise DataError(f"{name}: every sequence was dropped\n{report.summary()}")


def sequence_item(store: Store, i: int, name: str) -> TokenizedSequence:
    ids, _ = store.ids(i)
    return TokenizedSequence(ids, store.mask(i), int(store.columns["index"][i]), store.where(i, name))


def prepare_sft(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    completion_only: bool = True,
    split: str = "train",
    progress: bool = True,
    max_errors: int = 20,
) -> tuple[list[TokenizedSequence] | Examples[TokenizedSequence], SFTReport]:
    """Every record read, checked and tokenized; bad records reported together, as for pairs.
    Over ``data.max_length`` a sequence keeps its start (TRL's ``keep_start``). A file or a hub
    dataset is tokenized once into the tokenized store, and read from it lazily."""
    job = Job(
        kind="sft",
        settings={"completion_only": completion_only},
        parts=1,
        report_type=SFTReport,
        scan=lambda opened, sink, shown: scan_sft(
            opened, tokenizer, cfg, completion_only, sink, shown, max_errors
        ),
        item=sequence_item,
        finish=partial(finish_sft, max_errors=max_errors),
    )
    return tokenized(job, Source(source, split), tokenizer, cfg, progress)
