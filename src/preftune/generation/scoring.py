"""The reward interface: a scorer maps (prompt, completion) texts to rewards.

    scorer = load_scorer("runs/rm/final")            # a reward-model folder
    scorer = load_scorer("my_rewards:length_penalty")  # a Python function, named explicitly
    scorer = load_scorer("path/to/rewards.py:score")
    rewards = scorer(prompts, completions)           # list[float], one per completion

Evaluation, online DPO and PPO all score through this interface. A reward model keeps its
own tokenizer and is fed exactly what it was trained on (:func:`preftune.data.sequence_ids`:
the EOS text appended). A function is imported only when named; it is called in batches
with ``fn(prompts: list[str], completions: list[str]) -> list[float]`` and its answer is
checked (one finite number per completion).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..data import Text, sequence_ids
from ..data.files import write_jsonl
from ..data.layouts import pad_rows
from ..data.outputs import check_not_input, check_output_file
from ..errors import ModelLoadError, ScorerError
from ..model.reward_head import sequence_rewards


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]: ...


class RewardModelScorer:
    """A reward-model folder (``rm train``'s ``final/`` or any one-output sequence classifier)."""

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        progress: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        except Exception as err:
            raise ModelLoadError(f"{path}: could not load a reward model ({err})") from None
        if self.model.config.num_labels != 1:
            raise ModelLoadError(
                f"{path}: a classifier with {self.model.config.num_labels} labels, not a reward model"
            )
        if self.tokenizer.eos_token is None:
            raise ModelLoadError(f"{path}: its tokenizer has no eos_token to end completions with")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id  # pad positions are masked: any id will do

    def encode(self, prompt: Text, completion: Text) -> list[int]:
        try:
            ids = sequence_ids(self.tokenizer, prompt, completion)
        except Exception as err:
            raise ScorerError(f"{self.name}: its tokenizer cannot encode the text ({err})") from None
        # Over the limit keeps the end: the score is read at the last token.
        return ids[-self.max_length :] if self.max_length else ids

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        rows = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        # Longest first: an out-of-memory shows at the first batch, not the last.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        scores = [0.0] * len(rows)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="scoring", disable=None if self.progress else True, leave=False):
            chunk = order[start : start + self.batch_size]
            input_ids = pad_rows([rows[i] for i in chunk], self.pad_id)
            lengths = torch.tensor([len(rows[i]) for i in chunk])
            mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
            rewards = sequence_rewards(self.model, input_ids.to(self.device), mask.to(self.device))
            for i, value in zip(chunk, rewards.tolist(), strict=True):
                scores[i] = value
        return scores


class FunctionScorer:
    """A user's ``fn(prompts, completions) -> list[float]``, called in batches, answers checked.

    With ``allow_unscored`` (online DPO), ``None`` or NaN marks a completion the function will
    not score (returned as NaN, and left out of the pairs); otherwise every score must be finite.
    """

    def __init__(self, spec: str, batch_size: int = 64, allow_unscored: bool = False):
        self.name = spec
        self.fn = import_function(spec)
        self.batch_size = batch_size
        self.allow_unscored = allow_unscored

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = list(prompts[start : start + self.batch_size])
            batch_completions = list(completions[start : start + self.batch_size])
            try:
                answer = self.fn(batch_prompts, batch_completions)
            except Exception as err:
                raise ScorerError(f"reward function {self.name} raised {type(err).__name__}: {err}") from None
            scores += _check_scores(answer, len(batch_prompts), self.name, self.allow_unscored)
        return scores


def _check_scores(answer: Any, expected: int, name: str, allow_unscored: bool = False) -> list[float]:
    if isinstance(answer, torch.Tensor):
        answer = answer.detach().reshape(-1).tolist()
    try:
        values = [math.nan if v is None and allow_unscored else float(v) for v in answer]
    except (TypeError, ValueError):
        raise ScorerError(
            f"reward function {name} must return a list of {expected} numbers, got {type(answer).__name__}"
        ) from None
    if len(values) != expected:
        raise ScorerError(f"reward function {name} returned {len(values)} scores for {expected} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v) and not (allow_unscored and math.isnan(v))]
    if bad:
        raise ScorerError(
            f"reward function {name} returned a non-finite score ({values[bad[0]]}) at position {bad[0]}"
        )
    return values


def import_function(spec: str) -> Callable[..., Any]:
    """``module:function`` (found on the current directory or ``sys.path``) or ``file.py:function``."""
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ScorerError(f"{spec}: name a reward function as module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ScorerError(f"{spec}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ScorerError:
        raise
    except Exception as err:
        raise ScorerError(f"{spec}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ScorerError(f"{spec}: {module_name} has no function '{attribute}'")
    return fn


def load_scorer(spec: str, allow_unscored: bool = False, **model_options: Any) -> Scorer:
    """A reward-model folder (``model_options`` go to :class:`RewardModelScorer`), or a function
    named ``module:function`` / ``file.py:function``."""
    if Path(spec).is_dir():
        return RewardModelScorer(spec, **model_options)
    if ":" in spec:
        return FunctionScorer(spec, allow_unscored=allow_unscored)
    raise ScorerError(f"{spec}: not a reward-model folder, nor a function named module:function")


# --------------------------------------------------------------------------- preftune rm score


def check_scores_output(output: Path, data: Any, model: str) -> None:
    """``rm score``'s output, checked before the model loads: a file that can be written, and
    neither the records read nor inside the reward model's folder."""
    check_output_file(output, "--output")
    check_not_input(output, {"--data": data, "--model": model}, "--output")


def score_file(
    scorer: Scorer, source: Any, output: Path, data_cfg: Any, progress: bool = True
) -> dict[str, Any]:
    """Score every record of ``source`` and write ``output`` (JSONL, one object per record).

    Preference records (chosen/rejected) get both scores and whether chosen won; records with
    ``prompt`` and ``completion`` (or ``response``) get one score. A ``subset`` field gives
    per-subset accuracy, as RewardBench reports it. Returns the summary.
    """
    from ..data import parse_example, read_records

    rows: list[dict[str, Any]] = []
    prompts: list[Text] = []
    completions: list[Text] = []
    for index, (where, record) in enumerate(read_records(source)):
        subset = record.get("subset")
        if data_cfg.chosen_field in record or data_cfg.rejected_field in record:
            example = parse_example(record, where, data_cfg)
            rows.append({"index": index, "kind": "pair", "subset": subset})
            prompts += [example.prompt, example.prompt]
            completions += [example.chosen, example.rejected]
        else:
            field = next((f for f in ("completion", "response") if f in record), None)
            prompt = record.get(data_cfg.prompt_field)
            if (
                field is None
                or not isinstance(record[field], str | list)
                or not isinstance(prompt, str | list)
            ):
                raise ScorerError(
                    f"{where}: expected '{data_cfg.chosen_field}'/'{data_cfg.rejected_field}' or "
                    f"'{data_cfg.prompt_field}' and 'completion' (or 'response') fields"
                )
            rows.append({"index": index, "kind": "single", "subset": subset})
            prompts.append(prompt)
            completions.append(record[field])
    if not rows:
        raise ScorerError(f"{source}: no records")
    scores = scorer(prompts, completions)
    position = 0
    summary: dict[str, Any] = {"records": len(rows), "pairs": 0, "accuracy": None, "subsets": {}}
    subsets: dict[str, list[float]] = {}
    wins: list[float] = []
    lines = []
    for row in rows:
        out = {"index": row["index"]}
        if row["subset"] is not None:
            out["subset"] = row["subset"]
        if row["kind"] == "pair":
            chosen, rejected = scores[position], scores[position + 1]
            position += 2
            out.update(chosen_score=chosen, rejected_score=rejected, correct=chosen > rejected)
            wins.append(float(chosen > rejected))
            subsets.setdefault(str(row["subset"] or "all"), []).append(float(chosen > rejected))
        else:
            out["score"] = scores[position]
            position += 1
        lines.append(out)
    write_jsonl(output, lines)  # nothing half-written under the final name
    if wins:
        summary.update(pairs=len(wins), accuracy=sum(wins) / len(wins))
        summary["subsets"] = {name: sum(v) / len(v) for name, v in sorted(subsets.items())}
    return summary
