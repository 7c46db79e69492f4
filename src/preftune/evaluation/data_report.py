"""``preftune check-data``'s data report: what a preference set predicts about training, read from
the pairs (and, when given, the reference model and a reward model) before a step is paid for.

One pass over the pairs (as training tokenizes them; in words when no tokenizer is given) keeps per
pair only its lengths, three 64-bit digests (prompt, pair, swapped pair) and its ``file:line``, and
a uniform sample of ``sample`` pairs (seeded reservoir): lengths, duplicates and leakage are counted
over every pair, edit distances, the reference's log-probs and the reward model's scores on the
sample. Under a launcher (``torchrun``, ``accelerate launch``) the model and the scorer work on a
share of the sample each (every n-th pair, longest first) and the shares are gathered; the main
process prints and writes. The figures and findings are :mod:`.data_figures`'.
"""

from __future__ import annotations

import hashlib
import os
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..config import DataConfig, RunConfig
from ..data import DataReport, PreferenceExample, Text, TokenizedPair, parse_example, read_records, scan
from ..data.files import write_json
from ..data.prepare import parse_or_skip
from ..distributed import process_group
from ..errors import DataError
from ..model.set_logps import PairLogps, pair_logps_and_entropy
from .data_figures import (
    Finding,
    duplicate_figures,
    edit_figures,
    findings,
    leakage_figures,
    length_figures,
    off_policy_excess,
    reference_figures,
    relative_edit_distance,
    reward_figures,
)
from .metrics import edit_distance
from .plots import data_report_plot

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ReportOptions:
    """What the report reads beside the pairs, and where it writes."""

    model: str | None = None
    """The reference (or SFT) model: its log-probs of the pairs. A tokenizer-only folder gives none."""
    reward: str | None = None
    """A reward-model folder or ``module:function``: its agreement with the labels."""
    eval_data: str | None = None
    """Held-out pairs: those shared with the data."""
    output: Path | None = None
    """``report.json``; the figure goes beside it (``.png``)."""
    sample: int = 2000
    """Pairs the costly figures (edit distance, log-probs, rewards) are computed on; 0: all."""
    seed: int = 0
    batch_size: int = 8


# --------------------------------------------------------------------------- one pass over the pairs


def digest(values: Iterable[int]) -> int:
    """A signed 64-bit digest of a sequence of integers (token ids, or word digests)."""
    data = np.fromiter(values, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def pair_keys(pair: TokenizedPair) -> tuple[int, int, int]:
    """Digests of the prompt, of (prompt, chosen, rejected) and of (prompt, rejected, chosen)."""
    prompt, chosen, rejected = (digest(ids) for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))
    return prompt, digest((prompt, chosen, rejected)), digest((prompt, rejected, chosen))


class Profile:
    """What the report keeps of each pair, filled one pair at a time (:meth:`add`)."""

    def __init__(self, sample: int, seed: int = 0):
        self.size = sample
        self.rng = random.Random(seed)
        self.count = 0
        self.chosen_lengths, self.rejected_lengths = array("q"), array("q")
        self.keys = (array("q"), array("q"), array("q"))
        self.wheres: list[str] = []
        self.sample: list[TokenizedPair] = []

    def add(self, pair: TokenizedPair) -> None:
        self.chosen_lengths.append(len(pair.chosen_ids))
        self.rejected_lengths.append(len(pair.rejected_ids))
        for column, key in zip(self.keys, pair_keys(pair), strict=True):
            column.append(key)
        self.wheres.append(pair.where)
        self.count += 1
        # Reservoir sampling (Algorithm R): every pair is in the sample with probability size/count.
        if not self.size or len(self.sample) < self.size:
            self.sample.append(pair)
        elif (slot := self.rng.randrange(self.count)) < self.size:
            self.sample[slot] = pair

    def key_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prompts, pairs, swapped = (np.frombuffer(column, dtype=np.int64) for column in self.keys)
        return prompts, pairs, swapped

    def sampled(self) -> list[TokenizedPair]:
        return sorted(self.sample, key=lambda p: p.index)


def profile(pairs: Iterable[TokenizedPair], sample: int, seed: int = 0) -> Profile:
    out = Profile(sample, seed)
    for pair in pairs:
        out.add(pair)
    return out


def words(text: Text) -> list[str]:
    """A text's whitespace-separated words; a conversation's, over its messages' contents."""
    if isinstance(text, str):
        return text.split()
    return " ".join(str(message.get("content") or "") for message in text).split()


def word_pairs(source: Any, cfg: DataConfig, split: str = "train") -> Iterator[TokenizedPair]:
    """The valid pairs of ``source`` with each word as one unit (its 64-bit digest): the report
    without a tokenizer. Bad records are skipped (the format check reports them)."""
    for index, (where, record) in enumerate(read_records(source, split, errors=[])):
        try:
            example = parse_or_skip(record, where, cfg, None, DataReport())
        except DataError:
            continue
        if example is not None:
            prompt, chosen, rejected = (
                [digest(w.encode()) for w in words(t)]
                for t in (example.prompt, example.chosen, example.rejected)
            )
            yield TokenizedPair(prompt, chosen, rejected, index, where)


def examples_at(source: Any, cfg: DataConfig, split: str, indexes: set[int]) -> dict[int, PreferenceExample]:
    """The examples of the records at ``indexes`` (texts, for a scorer), in one streaming pass."""
    out = {}
    for index, (where, record) in enumerate(read_records(source, split, errors=[])):
        if index in indexes:
            out[index] = parse_example(record, where, cfg)
    return out


# --------------------------------------------------------------------------- models, on every process


def sharded(items: Sequence[T], cost: Callable[[T], int], compute: Callable[[list[T]], list[R]]) -> list[R]:
    """``compute`` over ``items`` shared among the launched processes (each takes every n-th item of
    the costliest-first order, so shares cost alike), gathered back in ``items``' order on every one."""
    rank, world = process_group()
    order = sorted(range(len(items)), key=lambda i: -cost(items[i]))
    mine = order[rank::world]
    values = compute([items[i] for i in mine])
    shares: list[Any] = [(mine, values)]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, (mine, values))
    out: list[Any] = [None] * len(items)
    for keys, answers in shares:
        for key, answer in zip(keys, answers, strict=True):
            out[key] = answer
    return out


def device() -> torch.device:
    """This process's device: the launcher's (the process group started by accelerate) or the first GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_model(name: str) -> bool:
    """A local folder without ``config.json`` holds a tokenizer only (what check-data's ``--model``
    used to need); anything else is loaded as a causal LM."""
    path = Path(name).expanduser()
    return not path.is_dir() or (path / "config.json").is_file()


def pair_cost(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


COLUMNS = tuple(
    f"{side}{name}" for name in ("", "_tokens", "_norm", "_entropy") for side in ("chosen", "rejected")
)
""":class:`PairLogps`' fields, as the processes exchange them."""


def reference_logps(
    model: Any, pairs: Sequence[TokenizedPair], pad_token_id: int, batch_size: int, layout: str = "auto"
) -> PairLogps:
    """The model's log-probs and entropies of ``pairs``, shared among the processes."""

    def compute(share: list[TokenizedPair]) -> list[list[float]]:
        out = pair_logps_and_entropy(model, share, pad_token_id, batch_size, layout)
        columns = [getattr(out, name) for name in COLUMNS]
        return torch.stack(columns, dim=1).tolist() if share else []

    rows = sharded(pairs, pair_cost, compute)
    table = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(COLUMNS))
    return PairLogps(**{name: table[:, k] for k, name in enumerate(COLUMNS)})


def reward_scores(scorer: Any, examples: Sequence[PreferenceExample]) -> tuple[list[float], list[float]]:
    """The scorer's rewards of each example's chosen and rejected, shared among the processes."""

    def compute(share: list[PreferenceExample]) -> list[tuple[float, float]]:
        prompts = [e.prompt for e in share]
        scores = scorer(prompts + prompts, [e.chosen for e in share] + [e.rejected for e in share])
        return list(zip(scores[: len(share)], scores[len(share) :], strict=True))

    rows = sharded(examples, lambda e: len(str(e.chosen)) + len(str(e.rejected)), compute)
    return [c for c, _ in rows], [r for _, r in rows]


# --------------------------------------------------------------------------- the report


def count_figures(prof: Profile, identical: int, units: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lengths and duplicates over every pair, edit distances over the sample; and the per-pair
    values the figure draws."""
    sample = prof.sampled()
    distances = [edit_distance(p.chosen_ids, p.rejected_ids) for p in sample]
    lengths = [(len(p.chosen_ids), len(p.rejected_ids)) for p in sample]
    chosen, rejected = (
        np.frombuffer(prof.chosen_lengths, np.int64),
        np.frombuffer(prof.rejected_lengths, np.int64),
    )
    figures: dict[str, Any] = {
        "pairs": prof.count,
        "sampled": len(sample),
        "units": units,
        "identical": identical,
        "edit_distance": edit_figures(distances, [c for c, _ in lengths], [r for _, r in lengths]),
        "length": length_figures(chosen, rejected),
        "duplicates": duplicate_figures(*prof.key_arrays(), prof.wheres),
    }
    relative = [relative_edit_distance(d, *lr) for d, lr in zip(distances, lengths, strict=True)]
    spread = {
        "edit distance over the longer completion (pairs)": {"": relative},
        f"len(chosen) − len(rejected), {units} (pairs)": {"": (chosen - rejected).tolist()},
    }
    return figures, spread


def model_figures(
    config: RunConfig, tokenizer: Any, sample: Sequence[TokenizedPair], options: ReportOptions
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reference's figures on the sample, and the off-policy excess of each completion."""
    from ..model.load import load_model

    model = load_model(config.model).to(device())
    logps = reference_logps(model, sample, tokenizer.pad_token_id, options.batch_size, config.data.layout)
    excess = {
        side: off_policy_excess(
            getattr(logps, side), getattr(logps, f"{side}_entropy"), getattr(logps, f"{side}_tokens")
        ).tolist()
        for side in ("chosen", "rejected")
    }
    return reference_figures(logps), {"nats per token below the model's own samples (completions)": excess}


def scorer_figures(
    source: Any, config: RunConfig, sample: Sequence[TokenizedPair], options: ReportOptions
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reward model's agreement with the labels of the sample."""
    from ..generation.rewards import load_scorer

    assert options.reward is not None
    scorer = load_scorer(options.reward, device=device(), batch_size=options.batch_size)
    texts = examples_at(source, config.data, config.data.split, {p.index for p in sample})
    chosen, rejected = reward_scores(scorer, [texts[p.index] for p in sample])
    margins = (np.asarray(chosen) - np.asarray(rejected)).tolist()
    return reward_figures(chosen, rejected, [p.where for p in sample]), {
        "reward of chosen − reward of rejected (pairs)": {"": margins}
    }


def leakage(prof: Profile, eval_data: str, tokenizer: Any, data: DataConfig) -> dict[str, Any]:
    """Held-out pairs read as the data is (tokens, or words), compared by digest."""
    if tokenizer is not None:
        held_out, _, _ = scan(eval_data, tokenizer, data, data.eval_split, False, None, 10**9)
    else:
        held_out = list(word_pairs(eval_data, data, data.eval_split))
    keys = np.array([pair_keys(p) for p in held_out], dtype=np.int64).reshape(-1, 3)
    prompts, pairs, _ = prof.key_arrays()
    return leakage_figures(
        (prompts, pairs), (keys[:, 0], keys[:, 1], keys[:, 2]), [p.where for p in held_out]
    )


def data_report(
    source: Any,
    pairs: Iterable[TokenizedPair] | None,
    tokenizer: Any,
    config: RunConfig,
    options: ReportOptions,
    identical: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The data report of ``source``: ``pairs`` as the scan tokenized them (None without a
    tokenizer: the records are read again, in words). Prints it, writes ``options.output`` and its
    figure, and returns what ``report.json`` holds."""
    data = config.data
    units = "tokens" if tokenizer is not None else "words"
    prof = profile(
        pairs if pairs is not None else word_pairs(source, data, data.split), options.sample, options.seed
    )
    if prof.count == 0:
        say("data report: no pair left to measure")
        return {"pairs": 0}
    figures, spread = count_figures(prof, identical, units)
    figures["seed"] = options.seed
    notes = []
    if options.eval_data:
        figures["eval_data"] = options.eval_data
        figures["leakage"] = leakage(prof, options.eval_data, tokenizer, data)
    if options.model and tokenizer is not None and is_model(options.model):
        figures["model"] = options.model
        figures["reference"], more = model_figures(config, tokenizer, prof.sampled(), options)
        spread.update(more)
    elif options.model:
        notes.append(
            f"log-probs: {options.model} holds a tokenizer only; give the reference model to see them"
        )
    if options.reward:
        figures["reward_name"] = options.reward
        figures["reward"], more = scorer_figures(source, config, prof.sampled(), options)
        spread.update(more)
    found = findings(figures)
    figures["findings"] = [f.as_dict() for f in found]
    if process_group()[0] == 0:
        say(format_report(figures, found, notes))
        if options.output is not None:
            written = [write_json(options.output, figures)]
            if data_report_plot(spread, options.output.with_suffix(".png")):
                written.append(options.output.with_suffix(".png"))
            say("wrote " + ", ".join(map(str, written)))
    return figures


def format_report(figures: dict[str, Any], found: Sequence[Finding], notes: Sequence[str] = ()) -> str:
    """The console's report: what was measured on what, the edit-distance shares, each finding."""
    pairs, sampled, units = figures["pairs"], figures["sampled"], figures["units"]
    on = (
        f"all {sampled:,}"
        if sampled == pairs
        else f"a uniform sample of {sampled:,} (--sample; seed {figures['seed']})"
    )
    edit = figures["edit_distance"]
    within = ", ".join(f"≤{k}: {100 * v:.1f}%" for k, v in edit["within"].items())
    lines = [
        f"data report: {pairs:,} pairs, in {units}; per-pair figures (edit distance, log-probs, rewards) on {on}",
        f"chosen and rejected differ in 1 to k {units}: {within}",
    ]
    for finding in found:
        mark = "!" if finding.fires else "ok"
        lines.append(f"{mark:>2} {finding.name}: {finding.evidence}")
        if finding.fires:
            lines.append(f"     try: {finding.setting}")
            lines += [f"     see: {finding.paper}"] if finding.paper else []
    return "\n".join([*lines, *notes])
