"""Unpaired records (KTO) -> validated examples -> token ids.

Two record shapes, field names configurable:

* unpaired: ``{"prompt", "completion", "label"}``, text or messages, ``label`` true for a
  desirable completion and false for an undesirable one (``data.label_field``);
* pairs: anything the pairwise reader accepts (``{"prompt", "chosen", "rejected"}``, messages,
  implicit prompts). Each pair becomes a desirable and an undesirable example, in the order TRL's
  ``unpair_preference_dataset`` gives them: per block of :data:`UNPAIR_BLOCK` pairs (the batch of
  its ``datasets`` map), every chosen completion first, then every rejected one.

Tokenized as TRL's ``KTOTrainer`` does, each example on its own: the prompt with the tokenizer's
special tokens, ``prompt + completion`` (+ EOS text for text records) as one string or through the
chat template, and the completion is what follows their longest common prefix.

Truncation follows :func:`preftune.data.truncate`: a prompt over ``max_prompt_length`` keeps its
end; a prompt that fills ``max_length`` alone is dropped (or stops the run); ``prompt +
completion`` over ``max_length`` keeps its start. That last cut is made by the collator, row by
row (TRL's), so a completion borrowed for another prompt's KL sequence is cut to that prompt.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .prepare import parse_or_skip
from .records import PreferenceExample, Text, check_text, template_kwargs
from .report import COUNTED_ABOVE, DataReport, Findings, spread, truncation_lines
from .scan import Scan, error_report, source_name
from .sft import empty_completion
from .tokenize import Encoder, overlong

UNPAIR_BLOCK = 1000


@dataclass
class UnpairedExample:
    """One validated example; ``field`` names where its completion came from (for messages)."""

    prompt: Text
    completion: Text
    desirable: bool
    where: str
    field: str
    template_kwargs: dict[str, Any] = dataclass_field(default_factory=dict)
    """The record's ``tools`` and ``chat_template_kwargs``."""

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


@dataclass
class TokenizedUnpaired:
    """Token ids of one example. ``completion_ids`` is whole: the collator cuts each row to
    ``max_length``, whichever prompt it follows."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    index: int
    where: str = ""


@dataclass
class UnpairedReport(DataReport):
    """What happened to the records; ``kept`` counts examples, ``pairs`` the records that were pairs."""

    examples: int = 0
    pairs: int = 0
    desirable: int = 0
    undesirable: int = 0

    def summary(self, with_findings: bool = True) -> str:
        split = f"{self.desirable} desirable, {self.undesirable} undesirable"
        source = f"; {self.pairs} pair{'s' * (self.pairs != 1)} unpaired" if self.pairs else ""
        lines = [
            f"{self.kept}/{self.examples} examples kept ({split}) from {self.records} records{source}",
            f"prompt tokens: {spread(self.prompt_lengths)}; completion tokens: {spread(self.completion_lengths)}",
        ]
        lines += truncation_lines(self, "completions", "examples")
        if self.identical:
            lines.append(
                f"{self.identical} pairs have chosen identical to rejected ({self.dropped_identical} dropped)"
            )
        return "\n".join(lines + (self.findings.lines(skip=COUNTED_ABOVE) if with_findings else []))


def check_label(value: Any, where: str, name: str) -> bool:
    """A label is a boolean; 0/1 and the texts true/false/1/0 (CSV cells) are read as one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{where}: field '{name}' must be true (desirable) or false (undesirable), got {value!r}")


def parse_unpaired(
    record: dict[str, Any], where: str, cfg: DataConfig, findings: Findings
) -> UnpairedExample | None:
    """Validate one ``{prompt, completion, label}`` record; None when ``data.empty_completions=drop``
    drops it."""
    for name in (cfg.prompt_field, cfg.completion_field, cfg.label_field):
        if name not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{where}: missing field '{name}' (fields present: {have})")
    prompt = check_text(record[cfg.prompt_field], where, cfg.prompt_field)
    completion = check_text(record[cfg.completion_field], where, cfg.completion_field)
    if isinstance(prompt, str) != isinstance(completion, str):
        raise DataError(
            f"{where}: fields '{cfg.prompt_field}' and '{cfg.completion_field}' mix text and messages; "
            "use one format"
        )
    label = check_label(record[cfg.label_field], where, cfg.label_field)
    kwargs = template_kwargs(record, where)
    kept = empty_completion(completion, where, cfg.completion_field, cfg, findings)
    if kept is None:
        return None
    return UnpairedExample(prompt, kept, label, where, cfg.completion_field, kwargs)


def unpair(pairs: list[PreferenceExample]) -> list[UnpairedExample]:
    """A block of pairs as TRL's ``unpair_preference_dataset`` lays it out: the chosen completions
    (desirable), then the rejected ones (undesirable), each with its pair's prompt."""
    chosen = [
        UnpairedExample(p.prompt, p.chosen, True, p.where, p.fields[0], p.template_kwargs) for p in pairs
    ]
    rejected = [
        UnpairedExample(p.prompt, p.rejected, False, p.where, p.fields[1], p.template_kwargs) for p in pairs
    ]
    return chosen + rejected


def read_unpaired(reading: Scan, cfg: DataConfig, report: UnpairedReport) -> list[UnpairedExample]:
    """Every record checked and pairs unpaired; bad records go to ``reading.errors``."""
    examples: list[UnpairedExample] = []
    block: list[PreferenceExample] = []

    def check(index: int, where: str, record: dict[str, Any]) -> None:
        nonlocal block
        paired = cfg.completion_field not in record and (
            cfg.chosen_field in record or cfg.rejected_field in record or bool(cfg.response_fields)
        )
        if paired:
            pair = parse_or_skip(record, where, cfg, None, report)
            if pair is not None:
                report.pairs += 1
                block.append(pair)
            if len(block) == UNPAIR_BLOCK:
                examples.extend(unpair(block))
                block = []
        elif cfg.completion_field in record or cfg.label_field in record:
            examples.extend(unpair(block))  # an unpaired record closes the block of pairs before it
            block = []
            example = parse_unpaired(record, where, cfg, report.findings)
            if example is not None:
                examples.append(example)
        else:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(
                f"{where}: expected fields '{cfg.prompt_field}', '{cfg.completion_field}' and "
                f"'{cfg.label_field}', or a pair ('{cfg.chosen_field}', '{cfg.rejected_field}') "
                f"(fields present: {have})"
            )

    reading.each(check)
    report.records = reading.records
    return examples + unpair(block)


def truncate_prompt(
    prompt_ids: list[int], where: str, cfg: DataConfig, report: DataReport
) -> list[int] | None:
    """Rules 1 and 2 of :func:`preftune.data.truncate`; None: the example is dropped."""
    if cfg.max_prompt_length is not None and len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - cfg.max_prompt_length :]
        report.prompt_truncated += 1
    if cfg.max_length is not None and len(prompt_ids) >= cfg.max_length:
        overlong(len(prompt_ids), where, cfg, report, "example")
        return None
    return prompt_ids


def scan_unpaired(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    max_errors: int = 20,
) -> tuple[list[TokenizedUnpaired], UnpairedReport, list[DataError]]:
    """Every record checked, unpaired and (with a tokenizer) tokenized and truncated; bad ones
    collected (up to ``max_errors``)."""
    report = UnpairedReport()
    reading = Scan(source, split, max_errors, progress, "checking", " records")
    examples = read_unpaired(reading, cfg, report)
    report.examples = len(examples)
    tokenized: list[TokenizedUnpaired] = []
    if tokenizer is None:
        return tokenized, report, reading.errors
    encoder = Encoder(tokenizer, cfg, report.findings)

    def check(item: tuple[int, UnpairedExample]) -> None:
        index, example = item
        # TRL's KTOTrainer tokenizes each example on its own, the completion starting where the
        # prompt's ids and prompt + completion's diverge.
        prompt_ids, (completion_ids,) = encoder.completions(
            example.prompt, [example.completion], example.template_kwargs, example.where, (example.field,)
        )
        if not completion_ids:
            raise DataError(f"{example.where}: field '{example.field}' tokenizes to no completion token")
        report.prompt_lengths.append(len(prompt_ids))
        report.completion_lengths.append(len(completion_ids))
        prompt = truncate_prompt(prompt_ids, example.where, cfg, report)
        if prompt is None:
            return
        if cfg.max_length is not None and len(prompt) + len(completion_ids) > cfg.max_length:
            report.completion_truncated += 1
        tokenized.append(TokenizedUnpaired(prompt, completion_ids, example.desirable, index, example.where))

    reading.over(enumerate(examples), check)
    report.kept = len(tokenized)
    report.desirable = sum(e.desirable for e in tokenized)
    report.undesirable = report.kept - report.desirable
    return tokenized, report, reading.errors


def prepare_unpaired(
    source: Any,
    tokenizer: Any,
    cfg: DataConfig,
    split: str = "train",
    progress: bool = True,
    max_errors: int = 20,
) -> tuple[list[TokenizedUnpaired], UnpairedReport]:
    """Read, validate, unpair, tokenize and truncate every record of ``source``; bad records are
    reported together in one :class:`DataError` (the first line is the first error)."""
    name = source_name(source)
    examples, report, errors = scan_unpaired(source, tokenizer, cfg, split, progress, max_errors)
    if errors:
        raise error_report(name, errors, len(errors) >= max_errors)
    if report.records == 0:
        raise DataError(f"{name}: no records")
    if report.identical and cfg.identical_pairs == "warn":
        warnings.warn(f"{report.identical} pairs have chosen identical to rejected", stacklevel=2)
    if not examples:
        raise DataError(f"{name}: every example was dropped\n{report.summary()}")
    return examples, report


def balance_warning(
    desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """The KTO paper's advice (Eq. 8) for unequal counts: ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``.
    Returns the warning TRL gives (with the ranges of either weight that satisfy it), or None."""
    n_d, n_u = desirable, undesirable
    if n_d == n_u or not n_d or not n_u:  # one kind alone: no ratio to advise on
        return None
    ratio = desirable_weight * n_d / max(undesirable_weight * n_u, 1e-12)
    if 1 <= ratio <= 4 / 3:
        return None
    lower_d = undesirable_weight * n_u / n_d
    upper_u = desirable_weight * n_d / n_u
    return (
        f"{n_d} desirable and {n_u} undesirable examples, and objective.desirable_weight={desirable_weight}, "
        f"objective.undesirable_weight={undesirable_weight} put λ_D·n_D / (λ_U·n_U) at {ratio:.3g}, outside "
        f"the KTO paper's [1, 4/3]: set desirable_weight in [{lower_d:.3g}, {4 / 3 * lower_d:.3g}] or "
        f"undesirable_weight in [{3 / 4 * upper_u:.3g}, {upper_u:.3g}] (not both)"
    )
