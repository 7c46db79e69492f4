"""Supervised fine-tuning: the next-token NLL of completions, assistant turns or whole texts.

    records -> TokenizedSequence (ids + loss mask) -> SequenceBatch -> the chunked head
    -> summed NLL per sequence -> the harness, which divides by the step's loss tokens

The loss is a token mean over the whole optimizer step, as TRL's ``SFTTrainer`` computes it
(``num_items_in_batch``), so gradient accumulation and several processes change nothing.
Metrics carry TRL's names: ``loss``, ``mean_token_accuracy``, ``entropy`` (token means),
``num_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

from ..config import RunConfig
from ..data.layouts import SequenceBatch, collate_sequences
from ..data.outputs import releases_locks
from ..data.sft import SFTReport, TokenizedSequence, prepare_sft
from ..engine import ExampleSteps, Harness, Models, Task, TrainResult
from ..model.load import load_model, prepare_for_training
from ..model.logps import LogpsRequest, PolicyLogps
from ..model.reference import weights_digest
from .common import tokenizer_for


def sft_loss(policy: nn.Module, batch: SequenceBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Per sequence: the summed NLL of its loss tokens, how many the argmax got right, and the
    summed entropy; the harness turns sums into token means."""
    sequences = policy(batch)
    return -sequences.logps, {
        "mean_token_accuracy": sequences.stats["correct"],
        "entropy": sequences.stats["entropy"],
    }


def loss_tokens(sequence: TokenizedSequence) -> float:
    return float(sequence.loss_tokens)


@releases_locks
def train_sft(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Fine-tune ``config.model`` (or ``model``) on ``config.data`` (or the records given)."""
    # check
    harness = Harness(config, "sft")

    # data: every record checked before any model loads
    tokenizer = tokenizer_for(config, tokenizer)
    examples, eval_examples, report = load_sequences(harness, tokenizer, train_data, eval_data)
    harness.decide_start()

    # load
    model = prepare_for_training(model if model is not None else load_model(config.model), config.model)
    where = "completions and assistant turns" if config.data.completion_only_loss else "every token"
    harness.say(f"supervised fine-tuning: loss on {where}")

    # loop, then final/: the harness
    task = Task(
        examples=examples,
        collate=partial(collate_sequences, pad_token_id=tokenizer.pad_token_id),
        loss=sft_loss,
        eval_examples=eval_examples,
        console=("loss", "mean_token_accuracy"),
        unit="sequences",
        weight=loss_tokens,
    )
    models = Models(
        PolicyLogps(model, LogpsRequest(stats=("correct", "entropy")), config.train.logps_chunk_size),
        model,
        tokenizer,
        start_digest=weights_digest(model),
        card={"kind": "sft", "objective": "next-token NLL", "loss on": where},
    )
    result = harness.fit(models, ExampleSteps(task, harness.accelerator, config.train), stop_after)
    result.data_report = report
    return result


def load_sequences(
    harness: Harness, tokenizer: Any, train_data: Any, eval_data: Any
) -> tuple[Sequence[TokenizedSequence], Sequence[TokenizedSequence], SFTReport]:
    """Training and eval sequences (the records given, or ``data.path`` / ``data.eval_path``)."""
    data, progress = harness.config.data, harness.config.train.progress and harness.is_main
    source = train_data if train_data is not None else data.path
    examples, report = prepare_sft(source, tokenizer, data, data.completion_only_loss, data.split, progress)
    harness.say(f"data: {report.summary()}")
    eval_examples: Sequence[TokenizedSequence] = []
    if eval_data is not None or data.eval_path:
        eval_source = eval_data if eval_data is not None else data.eval_path
        eval_examples, _ = prepare_sft(
            eval_source, tokenizer, data, data.completion_only_loss, data.eval_split, False
        )
    return examples, eval_examples, report
