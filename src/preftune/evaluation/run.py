"""``preftune eval`` as a function: check every input, load the models, evaluate, write the report.

Shared by the command and by the pipeline's ``eval`` stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..data.outputs import (
    FolderLock,
    check_kind,
    check_not_input,
    check_output_dir,
    record_kind,
    releases_locks,
)
from ..errors import ConfigError
from ..generation.ensemble import EnsembleScorer, is_ensemble
from ..generation.rewards import load_scorer
from ..generation.scoring import RewardModelScorer, Scorer
from ..model.attention import choose_layout
from ..model.load import check_local_path, load_model, load_tokenizer
from .evaluate import check_tokenizers, evaluate, load_sets, score_sets
from .report import format_table, write_outputs
from .settings import EvalSettings


@releases_locks
def run_eval(
    config: RunConfig,
    specs: list[tuple[str, Any]],
    output: Path,
    settings: EvalSettings,
    *,
    reference: str | None = None,
    reward_model: str | None = None,
    reward: str | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Evaluate ``config.model`` (the policy) on the named preference sets ``specs``, against the
    ``reference`` checkpoint and a ``reward_model`` folder or ``reward`` function when given;
    returns the summary that ``OUTPUT/eval.json`` holds. The pairs are batched in the layout
    ``data.layout`` allows for these models, whatever ``settings.layout`` says."""
    # Everything that can be wrong with the input is checked before a model loads, the output first.
    check_output_dir(output, "--output")
    if reward_model:
        check_local_path(reward_model, "--reward-model")
    inputs = {"--policy": config.model.name_or_path, "--reference": reference, "--reward-model": reward_model}
    inputs |= {"--reward": reward, **{f"--data {name}": source for name, source in specs}}
    check_not_input(output, inputs, "--output")
    check_kind(output, "eval", "--output")
    FolderLock(output, "eval", "--output").acquire()  # until the report is written
    tokenizer = load_tokenizer(config.model, config.data.chat_template)
    if reference:
        reference_cfg = dataclasses.replace(config.model, name_or_path=reference)
        check_tokenizers(tokenizer, load_tokenizer(reference_cfg), reference)
    sets = load_sets(specs, tokenizer, config.data)
    scorer: Scorer | None = None
    how = {"aggregate": config.reward.aggregate, "uncertainty_penalty": config.reward.uncertainty_penalty}
    if reward_model and is_ensemble(reward_model):
        scorer = EnsembleScorer(reward_model, **how, batch_size=settings.batch_size, progress=True)  # type: ignore[arg-type]
    elif reward_model:
        scorer = RewardModelScorer(reward_model, batch_size=settings.batch_size, progress=True)
    elif reward:
        scorer = load_scorer(reward, **how)  # type: ignore[arg-type]
    if settings.samples and not reference:
        raise ConfigError("--samples: the KL estimate and the win rate need a reference (--reference)")
    rewards = score_sets(scorer, sets) if scorer is not None else None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = load_model(config.model).to(device)
    reference_model = load_model(config.model, reference).to(device) if reference else None
    layout, notice = choose_layout(config.data.layout, policy, reference_model, device_type=device)
    if notice:
        say(notice)
    result = evaluate(
        policy,
        tokenizer,
        sets,
        reference_model,
        scorer,
        dataclasses.replace(settings, layout=layout, progress=True),
        rewards=rewards,
        names={"policy": config.model.name_or_path, "reference": reference, "reward": reward_model or reward},
    )
    say(format_table(result.summary))
    record_kind(output, "eval")
    paths = write_outputs(result, output)
    say(f"wrote {paths[0]}" + "".join(f"\n      {p}" for p in paths[1:]))
    return result.summary
