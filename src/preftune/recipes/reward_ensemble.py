"""Reward-model ensembles: ``rm train --ensemble K`` (``rm.ensemble``, ``rm.ensemble_kind``, ``rm.bootstrap``).

    full   K reward models, one harness run each in OUTPUT/member-KK/: member k starts from the
           model given with a new head drawn from seed + k, trains on its bootstrap resample of
           the pairs (or on all of them) in its own order; final/member-KK/ is its final/.
    lora   the same runs with LoRA adapters on the model (each with its own head, which peft trains
           whole); final/base/ is the starting model, final/member-KK/ member k's adapter.
    heads  one harness run in OUTPUT/ of one backbone with K heads (a K-output classifier):
           the loss is the mean of the K heads' Bradley–Terry losses, each pair weighted for head k
           by how often member k's bootstrap resample drew it.

``final/ensemble.json`` says which (:mod:`preftune.generation.ensemble`); any scorer loads the folder
as one reward model and aggregates its members. Members are trained one after another and each run
is a normal one (checkpoints, ``--resume``, ``metrics.jsonl``): a resumed ensemble skips the
members that finished and resumes the one that did not. Each member's draws (its head, its
resample, its data order) come from ``train.seed + k``, so a resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig, to_dict
from ..data import TokenizedPair
from ..data.layouts import Batch
from ..engine import Harness, LossFn, TrainResult
from ..errors import ConfigError
from ..generation.ensemble import EnsembleScorer, write_manifest
from ..generation.scoring import batched_rewards
from ..model.load import load_reward_model
from ..model.reward_head import reward_parts
from .common import load_pairs, tokenizer_for
from .reward_fit import fit_reward_model


def train_reward_ensemble(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    train_data: Any = None,
    eval_data: Any = None,
    stop_after: int | None = None,
) -> TrainResult:
    """An ensemble of ``rm.ensemble`` reward models in ``train.output_dir`` (see the module
    docstring). ``stop_after`` stops after that many optimizer steps in all, as if interrupted."""
    # check, and the data: every record checked once, before any model loads
    harness = Harness(config)
    tokenizer = tokenizer_for(config, tokenizer)
    pairs, eval_pairs, report = load_pairs(harness, tokenizer, train_data, eval_data, config.rm.margin_field)
    rm = config.rm
    harness.say(
        f"reward ensemble: {rm.ensemble} members ({rm.ensemble_kind}), each on "
        + ("a bootstrap resample of the pairs" if rm.bootstrap else "every pair")
        + ", with a new head of its own"
    )
    if rm.ensemble_kind == "heads":
        result = _train_heads(harness, model, tokenizer, pairs, eval_pairs, stop_after)
    else:
        result = _train_members(harness, model, tokenizer, pairs, eval_pairs, stop_after)
    if result.final_dir is not None:
        summary = ensemble_summary(
            result.final_dir, eval_pairs, tokenizer.pad_token_id, config.train.batch_size
        )
        result.history.append({"step": result.steps, **summary})
        if summary:
            harness.say(describe(summary))
        harness.say(f"saved {result.final_dir} (an ensemble of {rm.ensemble}, {rm.ensemble_kind})")
    result.data_report = report
    return result


# --------------------------------------------------------------------------- heads on one backbone


def _train_heads(
    harness: Harness,
    model: nn.Module | None,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    stop_after: int | None,
) -> TrainResult:
    """One run of a K-output model in the output folder; ``final/`` gets its manifest."""
    config, k = harness.config, harness.config.rm.ensemble
    harness.decide_start()
    model = _starting_model(config, model, tokenizer, harness.say)
    new_heads(model, k, config.train.seed)
    weights = bootstrap_weights(pairs, eval_pairs, k, config.train.seed, config.rm.bootstrap)
    loss = ensemble_loss(config.rm.center_rewards_coefficient, weights)
    card = {"ensemble": f"{k} heads on one backbone ({_data(config)})"}
    result, _ = fit_reward_model(harness, model, tokenizer, pairs, eval_pairs, stop_after, loss, card)
    if result.final_dir is not None:
        write_manifest(result.final_dir, "heads", [f"head-{i:02d}" for i in range(k)], **_described(config))
    return result


def bootstrap_weights(
    pairs: Sequence[TokenizedPair], eval_pairs: Sequence[TokenizedPair], k: int, seed: int, bootstrap: bool
) -> Tensor:
    """``[I, K]`` how many times member k's resample drew the pair of dataset index i (a bootstrap:
    N draws with replacement from the N pairs, with its own seed ``seed + k``); 1 everywhere without
    the bootstrap, and for eval pairs."""
    size = 1 + max(p.index for p in [*pairs, *eval_pairs])
    table = torch.ones(size, k)
    if bootstrap:
        rows = torch.tensor([p.index for p in pairs])
        for member in range(k):
            drawn = torch.randint(
                len(pairs), (len(pairs),), generator=torch.Generator().manual_seed(seed + member)
            )
            table[rows, member] = torch.bincount(drawn, minlength=len(pairs)).float()
    return table


def ensemble_loss(center_coefficient: float | None, weights: Tensor) -> LossFn:
    """The K heads' Bradley–Terry losses, each pair's weighted per head by ``weights`` (its bootstrap
    counts), averaged over the heads:

        loss_i = (1/K) Σ_k c_ik · (−log σ(r_w,k − r_l,k − m_i)  [+ c·(r_w,k + r_l,k)²])

    so that over an epoch head k sees its own resample. Metrics: ``accuracy`` and ``margin``, the
    heads' mean; ``ensemble_accuracy``, the heads' mean reward's; ``disagreement``, the heads'
    standard deviation of each reward, averaged over the pair's two."""

    def loss(reward_model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = reward_model(batch)  # [S, K]
        chosen, rejected = rewards[batch.chosen], rewards[batch.rejected]
        per_head = -F.logsigmoid(chosen - rejected - batch.margins[:, None])
        if center_coefficient:
            per_head = per_head + center_coefficient * (chosen + rejected) ** 2
        counts = weights.to(per_head.device)[batch.pair_index.to(per_head.device)]
        detached = rewards.detach()
        spread = detached.std(dim=1, unbiased=False)
        return (counts * per_head).mean(dim=1), {
            "accuracy": (chosen > rejected).float().mean(dim=1),
            "margin": (chosen - rejected).detach().mean(dim=1),
            "ensemble_accuracy": (chosen.mean(dim=1) > rejected.mean(dim=1)).float(),
            "disagreement": (spread[batch.chosen] + spread[batch.rejected]) / 2,
            "min_reward": detached.min(),
            "mean_reward": detached.mean(),
            "max_reward": detached.max(),
        }

    return loss


# --------------------------------------------------------------------------- K runs: full or LoRA


def _train_members(
    harness: Harness,
    model: nn.Module | None,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    stop_after: int | None,
) -> TrainResult:
    """Member after member, each a run of its own in ``member-KK/``; then ``final/``."""
    config, output = harness.config, harness.output_dir
    if isinstance(config.train.resume, str):
        raise ConfigError(
            f"train.resume: {config.train.resume}: an ensemble resumes from its folder (--resume), member by "
            "member, not from one checkpoint named"
        )
    _claim(output, config.train.resume, config.train.overwrite, harness.is_main)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    budget, steps, history = stop_after, 0, []
    for k in range(config.rm.ensemble):
        folder = output / f"member-{k:02d}"
        if _complete(folder, config.rm.ensemble_kind):
            harness.say(f"member {k}: complete in {folder}")
            continue
        harness.say(f"member {k}: training in {folder}")
        result = _train_member(config, k, model, tokenizer, pairs, eval_pairs, budget)
        steps += result.steps
        history += [{"member": k, **row} for row in result.history]
        if result.final_dir is None:  # stopped, as if interrupted
            return TrainResult(output, steps, history)
        if budget is not None:
            budget -= result.steps
    final = _assemble(config, model, tokenizer)
    return TrainResult(output, steps, history, final)


def _train_member(
    config: RunConfig,
    k: int,
    model: nn.Module | None,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    stop_after: int | None,
) -> TrainResult:
    """Member ``k``: its own run, seed ``train.seed + k``; a LoRA member's adapter goes to ``adapter/``."""
    member = member_config(config, k)
    harness = Harness(member)
    harness.decide_start()
    start = _starting_model(member, model, tokenizer, harness.say)
    new_heads(start, 1, member.train.seed)
    data = resample(pairs, member.train.seed) if config.rm.bootstrap else pairs
    card = {"ensemble": f"member {k} of {config.rm.ensemble} ({_data(config)})"}
    result, trained = fit_reward_model(harness, start, tokenizer, data, eval_pairs, stop_after, None, card)
    peft_model: Any = trained
    if config.rm.ensemble_kind == "lora" and result.final_dir is not None:
        # The adapter and its head are the member; the merged copy in final/ would be K full models.
        peft_model.save_pretrained(harness.output_dir / ".tmp-adapter")
        os.replace(harness.output_dir / ".tmp-adapter", harness.output_dir / "adapter")
        shutil.rmtree(result.final_dir)
    return result


def member_config(config: RunConfig, k: int) -> RunConfig:
    """Member ``k``'s run: its folder, its seed, one model (LoRA for the ``lora`` kind)."""
    folder = Path(config.train.output_dir) / f"member-{k:02d}"
    train = dataclasses.replace(
        config.train,
        output_dir=str(folder),
        seed=config.train.seed + k,
        resume=config.train.resume and folder.exists(),
        overwrite=False,
    )
    lora = config.model.lora or config.rm.ensemble_kind == "lora"
    return dataclasses.replace(
        config,
        train=train,
        model=dataclasses.replace(config.model, lora=lora),
        rm=dataclasses.replace(config.rm, ensemble=1),
    )


def resample(pairs: Sequence[TokenizedPair], seed: int) -> list[TokenizedPair]:
    """A bootstrap resample: as many pairs as there are, drawn with replacement (seeded)."""
    drawn = torch.randint(len(pairs), (len(pairs),), generator=torch.Generator().manual_seed(seed))
    return [pairs[i] for i in drawn.tolist()]


def _complete(folder: Path, kind: str) -> bool:
    return (folder / ("adapter" if kind == "lora" else "final")).is_dir()


def _assemble(config: RunConfig, model: nn.Module | None, tokenizer: Any) -> Path:
    """``final/``: the members (hard links to their files where the file system allows: no second
    copy on disk), or the base model and the adapters; then the manifest, written last."""
    output, k, kind = Path(config.train.output_dir), config.rm.ensemble, config.rm.ensemble_kind
    staging, final = output / ".tmp-final", output / "final"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    names = [f"member-{i:02d}" for i in range(k)]
    for name in names:
        source = output / name / ("adapter" if kind == "lora" else "final")
        shutil.copytree(source, staging / name, copy_function=_link_or_copy)
    if kind == "lora":
        base: Any = _starting_model(config, model, tokenizer, lambda *_: None)
        base.save_pretrained(staging / "base")
        tokenizer.save_pretrained(staging / "base")
    write_manifest(staging, kind, names, **_described(config))
    (staging / "README.md").write_text(_card(config, names), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _claim(output: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    """A fresh ensemble never mixes with an earlier run's members: refuse, or clear with overwrite."""
    earlier = [p for p in (*output.glob("member-*"), output / "final") if p.exists()]
    if not earlier or resume:
        return
    if not overwrite:
        raise ConfigError(
            f"train.output_dir: {output} holds an earlier run ({earlier[0].name}); add --resume to continue "
            "it, or --set train.overwrite=true to start over"
        )
    if is_main:
        for path in earlier:
            shutil.rmtree(path)


# --------------------------------------------------------------------------- shared pieces


def _starting_model(config: RunConfig, model: nn.Module | None, tokenizer: Any, say: Any) -> nn.Module:
    """A fresh copy of the starting model: the object given, or ``model.name_or_path`` loaded."""
    if model is not None:
        return copy.deepcopy(model)
    return load_reward_model(config.model, tokenizer.pad_token_id, say)


def new_heads(model: nn.Module, outputs: int, seed: int) -> None:
    """Replace ``model``'s reward head by a new linear one with ``outputs`` outputs, drawn as
    transformers draws a new head (normal, std ``initializer_range``; bias 0) from ``seed``:
    members that share a starting model differ from their first step."""
    get_base = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    _, head = reward_parts(model)
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"rm.ensemble: {type(base).__name__}'s reward head is not one linear layer; ensembles need one"
        )
    name = "score" if getattr(base, "score", None) is head else "classifier"
    fresh = nn.Linear(head.in_features, outputs, bias=head.bias is not None)
    std = float(getattr(base.config, "initializer_range", 0.02))
    with torch.no_grad():
        fresh.weight.copy_(
            torch.randn(outputs, head.in_features, generator=torch.Generator().manual_seed(seed)) * std
        )
        if fresh.bias is not None:
            fresh.bias.zero_()
    setattr(base, name, fresh.to(device=head.weight.device, dtype=head.weight.dtype))
    base.config.num_labels = outputs


def _data(config: RunConfig) -> str:
    return "a bootstrap resample of the pairs" if config.rm.bootstrap else "every pair"


def _described(config: RunConfig) -> dict[str, Any]:
    seed, k = config.train.seed, config.rm.ensemble
    return {"bootstrap": config.rm.bootstrap, "seeds": [seed + i for i in range(k)]}


def _card(config: RunConfig, names: list[str]) -> str:
    kind = config.rm.ensemble_kind
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [preftune, reward-model-ensemble]",
            f"base_model: {config.model.name_or_path or 'unknown'}",
            "---",
            "",
            f"# A reward-model ensemble of {len(names)} ({kind})",
            "",
            f"Trained with preftune (`rm train --ensemble {len(names)}`, `rm.ensemble_kind={kind}`), each member "
            f"on {_data(config)}, with seeds {_described(config)['seeds']}. `ensemble.json` names the members; "
            "`preftune rm score`, `online`, `ppo` and `eval` load this folder as one reward model and "
            "aggregate its members (`reward.aggregate`: mean, min, mean_minus_std).",
            "",
            "Each member's training is in `../member-KK/` (its `metrics.jsonl` and model card).",
            "",
        ]
    )


def ensemble_summary(
    final: Path, eval_pairs: list[TokenizedPair], pad_id: int, batch_size: int
) -> dict[str, Any]:
    """The saved folder, loaded as a scorer, on the eval pairs: each member's accuracy, the
    accuracy of each aggregate, and the members' disagreement (empty without eval pairs)."""
    if not eval_pairs:
        return {}
    from ..generation.aggregate import AGGREGATES, aggregate_rows

    scorer = EnsembleScorer(str(final), batch_size=batch_size, device="cpu")
    rows = [p.prompt_ids + ids for p in eval_pairs for ids in (p.chosen_ids, p.rejected_ids)]
    members = batched_rewards(rows, pad_id, batch_size, scorer.forwards)
    chosen, rejected = members[0::2], members[1::2]
    summary: dict[str, Any] = {}
    for k in range(len(members[0])):
        right = sum(c[k] > r[k] for c, r in zip(chosen, rejected, strict=True))
        summary[f"eval_accuracy/member_{k:02d}"] = right / len(eval_pairs)
    for how in AGGREGATES:
        a, b = aggregate_rows(chosen, how).rewards, aggregate_rows(rejected, how).rewards
        summary[f"eval_accuracy/{how}"] = sum(x > y for x, y in zip(a, b, strict=True)) / len(eval_pairs)
    summary["eval_accuracy"] = summary["eval_accuracy/mean"]
    summary["eval_disagreement"] = aggregate_rows(members, "mean").disagreement()
    return summary


def describe(summary: dict[str, Any]) -> str:
    members = [v for k, v in summary.items() if k.startswith("eval_accuracy/member_")]
    return (
        "ensemble on the eval pairs: members "
        + ", ".join(f"{v:.1%}" for v in members)
        + f"; mean {summary['eval_accuracy/mean']:.1%}, min {summary['eval_accuracy/min']:.1%}, "
        f"mean−std {summary['eval_accuracy/mean_minus_std']:.1%}; members' std {summary['eval_disagreement']:.3f}"
    )
