"""The reward interface: a scorer maps (prompt, completion) texts to rewards.

    scorer = load_scorer("runs/rm/final")            # (preftune.generation.rewards) a reward-model folder
    scorer = load_scorer("my_rewards:length_penalty")  # a Python function, named explicitly
    scorer = load_scorer("path/to/rewards.py:score")
    rewards = scorer(prompts, completions)           # list[float], one per completion

Evaluation, online DPO and PPO all score through this interface. A reward model keeps its
own tokenizer and is fed exactly what it was trained on (:func:`preftune.data.sequence_ids`:
the EOS text appended). A function is imported only when named; it is called in batches
with ``fn(prompts: list[str], completions: list[str]) -> list[float]`` and its answer is
checked (one finite number per completion).

Several rewards per completion — an ensemble folder (``rm train --ensemble K``,
:mod:`.ensemble`) or a function answering one row of K numbers per completion — are made into one
by ``aggregate`` (:mod:`.aggregate`: ``mean``, ``min``, ``mean_minus_std``); such a scorer also
answers :meth:`detail`, the members' rewards beside the aggregate.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Text
from ..data.files import write_jsonl
from ..data.layouts import pad_rows
from ..data.outputs import check_not_input, check_output_file
from ..data.tokenize import sequence_end
from ..errors import ModelLoadError, ScorerError
from ..model.reward_head import sequence_rewards
from .aggregate import Scores, aggregate_rows, score_detail

DEFAULT_TIMEOUT = 600.0
"""Seconds one call of a reward function may take (``reward.timeout``)."""


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]: ...


def load_reward_model_folder(path: str, device: torch.device, outputs: int = 1) -> tuple[Any, Any]:
    """The tokenizer and the sequence classifier of a reward-model folder with ``outputs`` outputs
    (1; an ensemble of heads has K), in eval mode on ``device``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    except Exception as err:
        raise ModelLoadError(f"{path}: could not load a reward model ({err})") from None
    if model.config.num_labels != outputs:
        what = "a reward model" if outputs == 1 else f"an ensemble of {outputs} heads"
        raise ModelLoadError(f"{path}: a classifier with {model.config.num_labels} labels, not {what}")
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"{path}: its tokenizer has no eos_token to end completions with")
    return tokenizer, model.to(device)


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids [B, T], attention_mask [B, T]) -> rewards [B] or [B, k]."""


@torch.no_grad()
def batched_rewards(
    rows: list[list[int]], pad_id: int, batch_size: int, forwards: Sequence[Forward], progress: bool = False
) -> list[list[float]]:
    """Every row scored by every forward: ``out[i]`` holds row i's rewards, the forwards' outputs
    side by side. Rows are padded on the right in batches, longest first (an out-of-memory shows at
    the first batch, not the last); each batch goes through every forward before the next."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[float]] = [[] for _ in rows]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring", disable=None if progress else True, leave=False):
        chunk = order[start : start + batch_size]
        input_ids = pad_rows([rows[i] for i in chunk], pad_id)
        lengths = torch.tensor([len(rows[i]) for i in chunk])
        mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        columns = [forward(input_ids, mask).reshape(len(chunk), -1).float().cpu() for forward in forwards]
        for i, values in zip(chunk, torch.cat(columns, dim=1).tolist(), strict=True):
            out[i] = values
    return out


class RewardModelScorer:
    """A reward-model folder (``rm train``'s ``final/`` or any one-output sequence classifier).

    ``outputs``: how many outputs the classifier must have (an ensemble of K heads on one
    backbone has K, read through :meth:`columns`)."""

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        progress: bool = False,
        outputs: int = 1,
    ):
        self.name = path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model = load_reward_model_folder(path, self.device, outputs)
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id  # pad positions are masked: any id will do

    def encode(self, prompt: Text, completion: Text) -> list[int]:
        try:
            # Over the limit keeps the end: the score is read at the last token.
            return sequence_end(self.tokenizer, prompt, completion, self.max_length or None)
        except Exception as err:
            raise ScorerError(f"{self.name}: its tokenizer cannot encode the text ({err})") from None

    def forward(self, model: Any) -> Forward:
        """``model``'s rewards of a padded batch, on this scorer's device."""

        def run(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return sequence_rewards(model, input_ids.to(self.device), mask.to(self.device))

        return run

    def columns(
        self, prompts: Sequence[Text], completions: Sequence[Text], forwards: Sequence[Forward] | None = None
    ) -> list[list[float]]:
        """``[N][outputs]`` every output of the model (or of ``forwards``, each reading the rows
        this scorer's tokenizer makes) for each completion."""
        rows = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        forwards = forwards or [self.forward(self.model)]
        return batched_rewards(rows, self.pad_id, self.batch_size, forwards, self.progress)

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        return [row[0] for row in self.columns(prompts, completions)]


class FunctionScorer:
    """A user's ``fn(prompts, completions) -> list[float]``, called in batches, answers checked.

    With ``allow_unscored`` (online DPO), ``None`` or NaN marks a completion the function will
    not score (returned as NaN, and left out of the pairs); otherwise every score must be finite.
    A call that has not returned after ``timeout`` seconds (None: no limit) stops the scoring.
    A function may answer one row of K numbers per completion (a list of lists, or a ``[N, K]``
    tensor): the rows are members, made into one reward by ``aggregate``.
    """

    def __init__(
        self,
        spec: str,
        batch_size: int = 64,
        allow_unscored: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        aggregate: str = "mean",
        uncertainty_penalty: float = 1.0,
    ):
        self.name = spec
        self.fn = import_function(spec)
        self.batch_size = batch_size
        self.allow_unscored = allow_unscored
        self.timeout = timeout
        self.aggregate, self.uncertainty_penalty = aggregate, uncertainty_penalty

    def detail(self, prompts: Sequence[Text], completions: Sequence[Text]) -> Scores:
        rows: list[list[float]] = []
        total = len(prompts)
        batches = -(-total // self.batch_size)
        for number, start in enumerate(range(0, total, self.batch_size), 1):
            batch_prompts = list(prompts[start : start + self.batch_size])
            batch_completions = list(completions[start : start + self.batch_size])
            end = start + len(batch_prompts) - 1
            batch = f"batch {number} of {batches} (completions {start} to {end} of {total})"
            answer = self._call(batch_prompts, batch_completions, batch)
            answered = _check_rows(answer, len(batch_prompts), self.name, self.allow_unscored, batch)
            if rows and answered and len(answered[0]) != len(rows[0]):
                raise ScorerError(
                    f"reward function {self.name} answered {len(rows[0])} columns, then {len(answered[0])} "
                    f"in {batch}"
                )
            rows += answered
        if rows and len(rows[0]) == 1:
            return Scores([row[0] for row in rows])
        return aggregate_rows(rows, self.aggregate, self.uncertainty_penalty)

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        return self.detail(prompts, completions).rewards

    def _call(self, prompts: list[Text], completions: list[Text], batch: str) -> Any:
        """The function's answer on one batch, waited for at most ``timeout`` seconds. The call runs
        in a thread of its own, so that a call that never returns cannot hold the run: past the
        limit the run stops with a message, and the thread is left to end with the process."""
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                outcome["answer"] = self.fn(prompts, completions)
            except Exception as err:
                outcome["error"] = err
            finally:
                done.set()

        threading.Thread(target=call, name=f"reward function {self.name}", daemon=True).start()
        if not done.wait(self.timeout):
            raise ScorerError(
                f"reward function {self.name} did not return within reward.timeout={self.timeout:g} seconds on "
                f"{batch}; raise reward.timeout (null: no limit) if it is slow, or fix it if it hangs"
            )
        if "error" in outcome:
            err = outcome["error"]
            raise ScorerError(f"reward function {self.name} raised {type(err).__name__}: {err} (on {batch})")
        return outcome["answer"]


def _check_rows(answer: Any, expected: int, name: str, allow_unscored: bool, batch: str) -> list[list[float]]:
    """A function's answer as ``expected`` rows of numbers: one number each, or K each."""
    if isinstance(answer, torch.Tensor):
        answer = answer.detach().tolist()
    if isinstance(answer, list | tuple) and answer and all(isinstance(v, list | tuple) for v in answer):
        widths = {len(row) for row in answer}
        if len(widths) != 1 or 0 in widths:
            raise ScorerError(
                f"reward function {name} answered rows of different lengths ({sorted(widths)}) in {batch}"
            )
        if len(answer) != expected:
            raise ScorerError(
                f"reward function {name} returned {len(answer)} rows for {expected} completions in {batch}"
            )
        columns = [
            _check_scores([row[k] for row in answer], expected, name, allow_unscored, batch)
            for k in range(widths.pop())
        ]
        return [list(row) for row in zip(*columns, strict=True)]
    return [[value] for value in _check_scores(answer, expected, name, allow_unscored, batch)]


def _check_scores(
    answer: Any, expected: int, name: str, allow_unscored: bool = False, batch: str = "a batch"
) -> list[float]:
    """One number per completion, in order: a list or tuple of numbers (``None`` for an unscored
    completion when allowed), or a 1-D tensor or array. Anything else (a dict, a set, text, a
    generator, a table of several columns) is refused: a dict's keys are not its scores."""
    what, unscored = f"reward function {name}", " or None (unscored)" if allow_unscored else ""
    if isinstance(answer, torch.Tensor | np.ndarray):
        shape = tuple(answer.shape)
        if len(shape) == 2 and shape[1] == 1:
            answer = answer.reshape(-1)
        if len(answer.shape) != 1:
            raise ScorerError(
                f"{what} returned an array of shape {shape} on {batch}; it must return {expected} numbers, "
                "one per completion (one column of scores)"
            )
        answer = answer.tolist()
    if not isinstance(answer, list | tuple):
        hint = " (a dict is not read by position: return a list in the order of the completions)"
        raise ScorerError(
            f"{what} must return a list of {expected} numbers, one per completion, got "
            f"{type(answer).__name__} on {batch}{hint if isinstance(answer, dict) else ''}"
        )
    if len(answer) != expected:
        raise ScorerError(f"{what} returned {len(answer)} scores for {expected} completions on {batch}")
    values = []
    for i, value in enumerate(answer):
        if value is None and allow_unscored:
            value = math.nan
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, str) or not isinstance(value, numbers.Real):
            raise ScorerError(
                f"{what} returned {type(value).__name__} {value!r:.40} at position {i} on {batch}; "
                f"each score must be a number{unscored}"
            )
        value = float(value)
        if not math.isfinite(value) and not (allow_unscored and math.isnan(value)):
            raise ScorerError(f"{what} returned a non-finite score ({value}) at position {i} on {batch}")
        values.append(value)
    return values


def scorer_name(scorer: Any) -> str:
    """How a message names a scorer: ``reward function m:f``, ``reward model runs/rm/final``, or
    ``scorer NAME`` for an object given in Python."""
    if isinstance(scorer, FunctionScorer):
        return f"reward function {scorer.name}"
    if isinstance(scorer, RewardModelScorer):
        return f"reward model {scorer.name}"
    return f"scorer {getattr(scorer, 'name', type(scorer).__name__)}"


def scorer_identity(scorer: Any) -> dict[str, str]:
    """What a resumed run must score with again, as ``scorer.json`` keeps it: a function's name (a
    file's by its absolute path), a reward model's contents (a folder moved elsewhere is the same
    model; one whose files were replaced is not), an object's name."""
    if isinstance(scorer, RewardModelScorer):
        return {"scorer": scorer_name(scorer), "contents": folder_contents(Path(scorer.name))}
    if isinstance(scorer, FunctionScorer):
        module, _, function = scorer.name.rpartition(":")
        if module.endswith(".py"):
            module = str(Path(module).resolve())
        return {"scorer": scorer_name(scorer), "function": f"{module}:{function}"}
    return {"scorer": scorer_name(scorer)}


def same_scorer(saved: dict[str, Any], current: dict[str, str]) -> bool:
    """The identities name one scorer: the same contents for models, the same function, the same name."""
    for key in ("contents", "function"):
        if key in saved or key in current:
            return saved.get(key) == current.get(key)
    return saved.get("scorer") == current.get("scorer")


WHOLE = 16 << 20
"""Files up to this size are read whole for a folder's identity; larger ones by their first and last MiB."""


def folder_contents(folder: Path) -> str:
    """A digest of every file in ``folder``: its name, size and bytes (a weights file over
    :data:`WHOLE` by its first and last MiB and its size: a fine-tuned model differs there too)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            if size <= WHOLE:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(size - (1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()


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
    per-subset accuracy, as RewardBench reports it. A scorer with several members (an ensemble)
    also writes each member's scores, and the summary holds each member's accuracy beside the
    aggregate's. Returns the summary.
    """
    rows, prompts, completions = _records_to_score(source, data_cfg)
    scores = score_detail(scorer, prompts, completions)
    members = scores.members if scores.members and len(scores.members[0]) > 1 else None
    position = 0
    summary: dict[str, Any] = {"records": len(rows), "pairs": 0, "accuracy": None, "subsets": {}}
    subsets: dict[str, list[float]] = {}
    wins: list[float] = []
    member_wins: list[list[float]] = []
    lines = []
    for row in rows:
        out: dict[str, Any] = {"index": row["index"]}
        if row["subset"] is not None:
            out["subset"] = row["subset"]
        if row["kind"] == "pair":
            chosen, rejected = scores.rewards[position], scores.rewards[position + 1]
            out.update(chosen_score=chosen, rejected_score=rejected, correct=chosen > rejected)
            wins.append(float(chosen > rejected))
            subsets.setdefault(str(row["subset"] or "all"), []).append(float(chosen > rejected))
            if members is not None:
                a, b = members[position], members[position + 1]
                out.update(chosen_member_scores=a, rejected_member_scores=b)
                member_wins.append([float(x > y) for x, y in zip(a, b, strict=True)])
            position += 2
        else:
            out["score"] = scores.rewards[position]
            if members is not None:
                out["member_scores"] = members[position]
            position += 1
        lines.append(out)
    write_jsonl(output, lines)  # nothing half-written under the final name
    if wins:
        summary.update(pairs=len(wins), accuracy=sum(wins) / len(wins))
        summary["subsets"] = {name: sum(v) / len(v) for name, v in sorted(subsets.items())}
    if members is not None:
        summary["members"] = len(members[0])
        summary["disagreement"] = scores.disagreement()
        if member_wins:
            summary["member_accuracy"] = [
                sum(column) / len(member_wins) for column in zip(*member_wins, strict=True)
            ]
    return summary


def _records_to_score(source: Any, data_cfg: Any) -> tuple[list[dict[str, Any]], list[Text], list[Text]]:
    """Each record's kind (pair or single) and the texts to score, in order."""
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
    return rows, prompts, completions
