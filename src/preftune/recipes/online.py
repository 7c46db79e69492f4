"""Online (iterative) DPO with a reward model: sample, score, pair, train, repeat.

    for round r = 1 .. R:
        policy  <- the initial model (r = 1), else round r−1's final/
        samples <- K completions per prompt from the policy        round-RR/samples.jsonl
        rewards <- the scorer, minus the missing-EOS penalty
        pairs   <- a pair rule: best_worst, best_random, all_above_gap  round-RR/pairs.jsonl
        train   <- one round of the offline recipe on the pairs,     round-RR/train/
                   reference = the round's starting policy (or the initial model)
    final/      <- the last round's policy, saved as `train` saves it
    rounds.jsonl, online.json, online.png: reward, KL to the initial policy, EOS rate by round

An ensemble reward (``rm train --ensemble K``, or a function answering K columns) is aggregated by
``reward.aggregate``; each round logs the members' disagreement. A monitor (``reward.monitor``)
scores the same samples without being trained on: when the reward rises while the monitor falls
for ``reward.monitor_patience`` rounds the run warns, and with ``reward.stop_on_overoptimization``
it stops, ``final/`` being the policy the monitor scored best.

Training reads the completions' token ids exactly as they were generated (no decode/encode
trip). Every file is written whole or not at all; ``--resume`` skips complete rounds, reuses
a round's saved samples and resumes its training from the round's last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import RunConfig, to_dict, validate
from ..data import TokenizedPair
from ..data.files import read_jsonl, write_json, write_jsonl
from ..data.outputs import (
    FolderLock,
    check_kind,
    check_not_input,
    check_output_dir,
    config_inputs,
    held,
    record_kind,
    releases_locks,
)
from ..data.prompts import Prompt, check_room, read_prompts
from ..data.scan import source_name
from ..engine.card import model_card
from ..engine.checkpoint import save_final
from ..engine.guard import StopAtOnce
from ..engine.tracking import config_lines
from ..errors import ConfigError, DataError
from ..evaluation.metrics import sampled_kl
from ..evaluation.monitor import OveroptimizationMonitor
from ..generation.pair_rules import build_pairs
from ..generation.rewards import load_scorer
from ..generation.rollout import Rollout, eos_ids
from ..generation.sampling import as_completion, sample_summary, score_samples
from ..generation.scoring import Scorer, same_scorer, scorer_identity
from ..generation.vllm_engine import check_engine, rollout_factory
from ..losses import build_objective
from ..model.load import freeze, load_model
from ..model.quantize import check_available
from ..model.reference import live_copy
from ..model.set_logps import completion_logps
from .common import tokenizer_for
from .dpo import refuse_quantize_without_reference, train

RolloutFactory = Callable[[nn.Module], Rollout]


@dataclass
class OnlineResult:
    output_dir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    final_dir: Path | None = None


@releases_locks
def train_online(
    config: RunConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    prompts: Any = None,
    scorer: Scorer | None = None,
    rollout_for: RolloutFactory | None = None,
    stop_in_round: tuple[int, int] | None = None,
    monitor: Scorer | None = None,
) -> OnlineResult:
    """``config.online.rounds`` rounds of online DPO from ``config.model`` (or ``model``) on
    ``config.prompts`` (or the records given), scored by ``config.reward`` (or
    ``scorer``), watched by ``reward.monitor`` (or ``monitor``). ``rollout_for(policy)`` gives
    each round's sampler (default: transformers). ``stop_in_round=(r, k)`` stops round r after k
    training steps, as if interrupted."""
    # check
    validate(config)
    check_run(config, prompts is not None, scorer is not None, rollout_for is not None)
    if not held():  # a pipeline stage: the pipeline printed its keys
        print(config_lines(config), flush=True)
    check_monitor(config, monitor is not None)

    # data: the prompts, the reward and its monitor
    online, cfg = config.online, config.train
    tokenizer = tokenizer_for(config, tokenizer)
    source = prompts if prompts is not None else config.prompts.path
    prompt_rows = read_prompts(source, config.data, config.prompts.split, tokenizer, config.prompts.limit)
    check_room(prompt_rows, config.data, source_name(source))
    scorer, monitor = rewards_of(config, scorer, monitor, allow_unscored=True)
    output = Path(cfg.output_dir)
    FolderLock(output, "online", "train.output_dir").acquire()  # until the run ends
    identity = scorer_identity(scorer)
    done = _claim(output, bool(cfg.resume), cfg.overwrite, identity, config.reward.scorer)
    record_kind(output, "online")
    write_json(output / SCORER_FILE, identity)
    (output / "config.json").write_text(json.dumps(to_dict(config), indent=2))

    # load: the initial policy stays in memory, frozen
    initial = _initial_policy(config, model)
    make_rollout = rollout_for or rollout_factory(
        config.rollout,
        config.model.name_or_path,
        tokenizer.pad_token_id,
        eos_ids(initial, tokenizer),
        cfg.progress,
    )

    # loop: each round samples, scores and pairs, then trains on the harness's loop (`train`)
    run = OnlineRun(
        config, output, prompt_rows, scorer, tokenizer, initial, model, make_rollout, monitor=monitor
    )
    rows = [row for row in done if row["round"] <= online.rounds]
    for done_row in rows:  # a resumed run's monitor has seen the rounds done, as an uninterrupted one's had
        run.watch(done_row, quiet=True)
    each = online.prompts_per_round or len(prompt_rows)
    print(f"online: {each} prompts x {online.samples_per_prompt} samples a round, {online.rounds} rounds")
    # A signal outside a round's training stops the run at once, saying where (inside, the harness
    # finishes the step and checkpoints it).
    with run.stop:
        for r in range(len(rows) + 1, online.rounds + 1):
            if rows and rows[-1].get("stopped"):
                break
            stop_after = stop_in_round[1] if stop_in_round and stop_in_round[0] == r else None
            row = run.round(r, stop_after)
            if row is None:  # stopped inside the round, as if interrupted
                return OnlineResult(output, rows)
            rows.append(row)
            write_jsonl(output / "rounds.jsonl", rows)

        # save: the last round's policy (or the monitor's best) as final/, with its card; the summary
        return run.finish(rows)


def _initial_policy(config: RunConfig, model: nn.Module | None) -> nn.Module:
    """The initial policy, frozen: KL to it each round, and the reference of reference=initial
    (quantized as reference.quantize says). A model object is copied before the first round trains it."""
    if config.reference.quantize != "none":
        if model is not None:
            return live_copy(config, model)
        return freeze(load_model(config.model, None, config.reference.quantize))
    return freeze(load_model(config.model) if model is None else copy.deepcopy(model))


def rewards_of(
    config: RunConfig, scorer: Scorer | None, monitor: Scorer | None, allow_unscored: bool
) -> tuple[Scorer, Scorer | None]:
    """The reward (``reward.scorer``, an ensemble aggregated as ``reward.aggregate``) and its monitor
    (``reward.monitor``; an ensemble's mean), unless given as objects."""
    reward = config.reward
    if scorer is None:
        scorer = load_scorer(
            reward.scorer,
            allow_unscored,
            reward.timeout,
            aggregate=reward.aggregate,
            uncertainty_penalty=reward.uncertainty_penalty,
            batch_size=reward.batch_size,
        )
    if monitor is None and reward.monitor:
        monitor = load_scorer(reward.monitor, allow_unscored, reward.timeout, batch_size=reward.batch_size)
    return scorer, monitor


def check_monitor(config: RunConfig, has_monitor: bool) -> None:
    if config.reward.stop_on_overoptimization and not (has_monitor or config.reward.monitor):
        raise ConfigError(
            "reward.stop_on_overoptimization: needs a monitor to judge by (--monitor-reward SCORER, "
            "reward.monitor)"
        )


def check_run(config: RunConfig, has_prompts: bool, has_scorer: bool, has_rollout: bool) -> None:
    """What online DPO needs and refuses, before anything loads."""
    if not has_rollout:
        check_engine(config.rollout)
    check_available(config)
    refuse_quantize_without_reference(config, build_objective(config.objective))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "online: runs on one process for now (generation is not sharded); launch it plainly"
        )
    if not has_prompts and not config.prompts.path:
        raise ConfigError("prompts.path: required (--prompts FILE)")
    if not has_scorer and not config.reward.scorer:
        raise ConfigError("reward.scorer: required (--reward RM_FOLDER or module:function)")
    if isinstance(config.train.resume, str):
        raise ConfigError(
            "train.resume: an online run resumes by rounds, where it stopped: use --resume alone"
        )
    output = Path(config.train.output_dir)
    check_output_dir(output)
    check_not_input(output, config_inputs(config), "train.output_dir")
    check_kind(output, "online", "train.output_dir")


@dataclass
class OnlineRun:
    """What every round reads: the settings, the prompts, the scorer, the frozen initial policy."""

    config: RunConfig
    output: Path
    prompts: list[Prompt]
    scorer: Scorer
    tokenizer: Any
    initial: nn.Module
    model: nn.Module | None
    make_rollout: RolloutFactory
    stop: StopAtOnce = field(default_factory=StopAtOnce)
    """Says what a signal interrupted."""
    monitor: Scorer | None = None
    watcher: OveroptimizationMonitor | None = None

    def __post_init__(self) -> None:
        reward = self.config.reward
        if self.monitor is not None:
            self.watcher = OveroptimizationMonitor(
                reward.monitor_patience, reward.stop_on_overoptimization, noise_z=reward.monitor_noise_z
            )

    def watch(self, row: dict[str, Any], quiet: bool = False) -> None:
        """The monitor's verdict on the samples of ``row`` (a round's, or the final policy's), in it."""
        if self.watcher is None or row.get("monitor_mean") is None or row.get("reward_mean") is None:
            return
        verdict = self.watcher.add(
            row["round"],
            row["reward_mean"],
            row["monitor_mean"],
            row["kl_to_initial"],
            row.get("monitor_sem"),
        )
        row |= verdict.fields()
        if verdict.overoptimized and not quiet:
            print(verdict.message, flush=True)
        if verdict.stop:
            row["stopped"] = True

    def sample_and_measure(
        self, folder: Path, r: int, policy: nn.Module
    ) -> tuple[tuple[list[Prompt], list[list[dict[str, Any]]]], dict[str, Any]]:
        """Round ``r``'s prompts and scored samples of ``policy``, and what they measure."""
        prompts = prompt_slice(self.prompts, r, self.config.online.prompts_per_round)
        final = r > self.config.online.rounds
        self.stop.doing = "the final policy's sampling" if final else f"round {r}'s sampling and scoring"
        samples = _samples(folder, r, policy, self, prompts)
        self.stop.doing = "the final summary" if final else f"round {r}, after its samples were saved"
        pad, batch_size = self.tokenizer.pad_token_id, self.config.reference.batch_size
        stats = sample_stats(samples, policy, self.initial, prompts, pad, batch_size, r == 1)
        return (prompts, samples), stats

    def round(self, r: int, stop_after: int | None) -> dict[str, Any] | None:
        """Sample, score, pair and train round ``r``; its row, or None when stopped inside it."""
        config, online, started = self.config, self.config.online, time.perf_counter()
        self.stop.doing = f"round {r}"
        round_dir = self.output / f"round-{r:02d}"
        policy = _policy_at(r, self.model, config, self.output)
        row: dict[str, Any] = {"round": r, "policy": "initial" if r == 1 else f"after round {r - 1}"}
        (prompts, samples), stats = self.sample_and_measure(round_dir, r, policy)
        row |= stats
        self.watch(row)
        if row.get("stopped"):  # the monitor's verdict: this round does not train
            print(f"round {r}/{online.rounds}: {_describe(row)}", flush=True)
            return row
        triples, counts = build_pairs(
            [[s["reward"] for s in group] for group in samples],
            [[s["completion_ids"] for s in group] for group in samples],
            online.pair_rule,
            online.min_gap,
            seed=config.train.seed + r,
        )
        _write_pairs(round_dir / "pairs.jsonl", triples, samples, prompts)
        row |= {key: value for key, value in vars(counts).items() if key != "per_prompt"}
        print(f"round {r}/{online.rounds}: {_describe(row)}\n  {counts.summary()}", flush=True)
        if not triples:
            raise ConfigError(
                f"round {r}: no pair could be built ({counts.summary()}); sample more per prompt "
                "(online.samples_per_prompt), raise rollout.temperature, or lower online.min_gap"
            )
        # Each pair is named after its prompt's record: a warning or a stopped step points at the file.
        pairs = [
            TokenizedPair(
                prompts[p].ids,
                samples[p][a]["completion_ids"],
                samples[p][b]["completion_ids"],
                i,
                prompts[p].where,
            )
            for i, (p, a, b) in enumerate(triples)
        ]
        train_dir = round_dir / "train"
        train_settings = dataclasses.replace(
            config.train, output_dir=str(train_dir), resume=train_dir.exists(), overwrite=False
        )
        try:
            result = train(
                dataclasses.replace(config, train=train_settings),
                model=policy,
                tokenizer=self.tokenizer,
                train_data=pairs,
                reference_model=self.initial if online.reference == "initial" else None,
                stop_after=stop_after,
            )
        except DataError as err:  # every pair dropped: say which round
            raise DataError(f"round {r}: {err}") from None
        if result.final_dir is None:
            return None
        return row | _last_metrics(train_dir) | {"seconds": round(time.perf_counter() - started, 1)}

    def finish(self, rows: list[dict[str, Any]]) -> OnlineResult:
        """``final/``: the last round's policy with its model card (and the final policy's samples
        when ``online.final_samples``); ``online.json`` and ``online.png`` summarize the rounds."""
        config, online, output = self.config, self.config.online, self.output
        self.stop.doing = "the final policy's save"
        stopped = bool(rows and rows[-1].get("stopped"))
        trained = len(rows) - stopped  # rounds that trained
        # The last trained round's final/ as saved (a QLoRA run's merged weights, not quantized again).
        plain = dataclasses.replace(config, model=dataclasses.replace(config.model, load_in_4bit=False))
        final_policy = _policy_at(trained + 1, self.model, plain, output)
        final = None
        if online.final_samples and not stopped:
            final = {"round": "final", "policy": f"after round {online.rounds}"}
            final |= self.sample_and_measure(output / "final-samples", online.rounds + 1, final_policy)[1]
            self.watch(final)
            print(f"final policy: {_describe(final)}", flush=True)
            stopped = bool(final.get("stopped"))
        card = {
            "kind": "online-dpo",
            "objective": "+".join(config.objective.loss),
            "rounds": trained,
            "reward": config.reward.scorer or getattr(self.scorer, "name", "a scorer object"),
            "pair rule": online.pair_rule,
        }
        if stopped and self.watcher is not None:  # final/ is the policy the monitor scored best
            best = self.watcher.best()["at"]
            final_policy = _policy_at(
                online.rounds + 1 if best == "final" else best, self.model, config, output
            )
            card["stopped"] = f"on overoptimization; the policy of round {best}, best by the monitor"
        history = read_jsonl(output / f"round-{max(trained, 1):02d}" / "train" / "metrics.jsonl")
        final_dir = save_final(
            output, final_policy, self.tokenizer, model_card(output, config, history, card)
        )
        _write_summary(output, config, rows, final)
        print(f"saved {final_dir}", flush=True)
        return OnlineResult(output, rows, final, final_dir)


# --------------------------------------------------------------------------- the round's pieces


SCORER_FILE = "scorer.json"
"""What scored the run's samples (:func:`scorer_identity`): a resume must score with the same."""


def _claim(
    output: Path, resume: bool, overwrite: bool, identity: dict[str, str], spec: str
) -> list[dict[str, Any]]:
    """Rounds already complete (resume, by the same scorer), after clearing an earlier run
    (overwrite), or a refusal."""
    earlier = [
        *output.glob("round-*"),
        *(output / name for name in ("rounds.jsonl", "final", "final-samples")),
    ]
    earlier = [path for path in earlier if path.exists()]
    if not earlier:
        return []
    if resume:
        check_same_scorer(output, identity, spec)
        rows = read_jsonl(output / "rounds.jsonl")
        print(f"resume: {len(rows)} complete rounds in {output}")
        return rows
    if not overwrite:
        raise ConfigError(
            f"train.output_dir: {output} holds an earlier online run; use --resume to continue it, or "
            "--set train.overwrite=true to start over"
        )
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return []


def check_same_scorer(output: Path, identity: dict[str, str], spec: str) -> None:
    """A resumed run scores with the scorer that scored its saved samples, or their rewards and the
    new ones would be mixed in one run. A run from before ``scorer.json`` is checked by the name
    its ``config.json`` gives."""
    saved_file = output / SCORER_FILE
    if saved_file.exists():
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
        if same_scorer(saved, identity):
            return
        before, now = str(saved.get("scorer")), identity["scorer"]
        if before == now:
            now += " as it is now (its files changed)"
    else:
        config_file = output / "config.json"
        saved_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        before = str(saved_config.get("reward", {}).get("scorer") or "")
        if not before or not spec or before == spec:
            return
        now = spec
    raise ConfigError(
        f"reward.scorer: the online run in {output} was scored by {before}, and this run would score with "
        f"{now}; its saved samples carry the first one's rewards. Resume with the same --reward, or start "
        "over (--set train.overwrite=true, or another --output)"
    )


def prompt_slice(prompts: list[Prompt], r: int, per_round: int | None) -> list[Prompt]:
    """Round ``r``'s prompts: all of them, or the r-th run of ``per_round`` (wrapping around)."""
    if per_round is None:
        return prompts
    start = (r - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(per_round)]


def _policy_at(r: int, model: nn.Module | None, config: RunConfig, output: Path) -> nn.Module:
    """The policy round ``r`` starts from: the initial one, or round r−1's saved final weights (so a
    resumed run starts each round from exactly what an uninterrupted one did)."""
    if r == 1:
        return model if model is not None else load_model(config.model)
    return load_model(config.model, str(output / f"round-{r - 1:02d}" / "train" / "final"))


def _samples(
    folder: Path, r: int, policy: nn.Module, run: OnlineRun, prompts: list[Prompt]
) -> list[list[dict[str, Any]]]:
    """K scored completions per prompt, read back from ``samples.jsonl`` when a run being resumed
    already drew them; else generated, scored (and watched by the monitor), penalized and saved."""
    config = run.config
    path, k = folder / "samples.jsonl", config.online.samples_per_prompt
    if path.exists():
        flat = read_jsonl(path)
        if len(flat) != len(prompts) * k:
            raise ConfigError(
                f"{path}: holds {len(flat)} samples, but this run draws {len(prompts)} prompts x {k}; resume "
                "with the run's online.samples_per_prompt / prompts settings, or start over with "
                "train.overwrite=true"
            )
        print(f"round {r}: reusing {len(flat)} saved samples from {path}")
    else:
        ids = [prompt.ids for prompt in prompts for _ in range(k)]
        completions = run.make_rollout(policy).generate(
            ids, config.rollout, seed=config.train.seed * 1_000 + r, desc=f"round {r}: sampling"
        )
        penalty = config.rollout.missing_eos_penalty
        flat = score_samples(prompts, k, completions, run.scorer, run.tokenizer, penalty, run.monitor)
        write_jsonl(path, flat)
    return [flat[p * k : (p + 1) * k] for p in range(len(prompts))]


def _write_pairs(
    path: Path,
    triples: list[tuple[int, int, int]],
    samples: list[list[dict[str, Any]]],
    prompts: list[Prompt],
) -> None:
    """The round's pairs as preference records ``train`` reads again (with their rewards)."""
    records = []
    for p, a, b in triples:
        chosen, rejected = samples[p][a], samples[p][b]
        records.append(
            {
                "prompt": prompts[p].text,
                "chosen": as_completion(prompts[p].text, chosen["completion"]),
                "rejected": as_completion(prompts[p].text, rejected["completion"]),
                "chosen_reward": chosen["reward"],
                "rejected_reward": rejected["reward"],
            }
        )
    write_jsonl(path, records)


def _last_metrics(train_dir: Path) -> dict[str, Any]:
    """The round's training as its last logged step says it (loss, accuracy, margin, steps)."""
    last: dict[str, Any] = next(
        (h for h in reversed(read_jsonl(train_dir / "metrics.jsonl")) if "loss" in h), {}
    )
    names = {"loss": "train_loss", "rewards/accuracies": "train_accuracy", "rewards/margins": "train_margin"}
    return {"train_steps": last.get("step", 0), **{new: last.get(old) for old, new in names.items()}}


def _describe(row: dict[str, Any]) -> str:
    reward = "—" if row["reward_mean"] is None else f"{row['reward_mean']:.3f} (max {row['reward_max']:.3f})"
    extra = ""
    if row.get("reward_disagreement") is not None:
        extra += f", members' std {row['reward_disagreement']:.3f}"
    if row.get("monitor_mean") is not None:
        extra += f", monitor {row['monitor_mean']:.3f}"
    return (
        f"reward {reward}{extra}, EOS {row['eos_rate']:.0%}, {row['completion_tokens']:.1f} tokens, "
        f"KL to initial {row['kl_to_initial']:.2f} nats"
    )


def _write_summary(
    output: Path, config: RunConfig, rows: list[dict[str, Any]], final: dict[str, Any] | None
) -> None:
    from ..evaluation.plots import online_plot

    summary = {
        "config": to_dict(config)["online"],
        "rollout": to_dict(config)["rollout"],
        "rounds": rows,
        "final": final,
    }
    write_json(output / "online.json", summary)
    online_plot([*rows, *([final] if final else [])], output / "online.png")


def sample_stats(
    samples: list[list[dict[str, Any]]],
    policy: nn.Module,
    initial: nn.Module,
    prompts: list[Prompt],
    pad: int,
    batch_size: int,
    is_initial: bool,
) -> dict[str, Any]:
    """Mean and max reward, EOS rate, length, and KL(π‖π_initial) estimated on the samples."""
    flat = [s for group in samples for s in group]
    rewards = [s["reward"] for s in flat if s["reward"] is not None]
    kl, kl_stderr = 0.0, 0.0
    if not is_initial:
        prompt_ids = [prompts[s["prompt_index"]].ids for s in flat]
        completion_ids = [s["completion_ids"] for s in flat]
        under_policy = completion_logps(policy, prompt_ids, completion_ids, pad, batch_size)
        under_initial = completion_logps(initial, prompt_ids, completion_ids, pad, batch_size)
        kl, kl_stderr = sampled_kl(under_policy, under_initial)
    return {
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "reward_max": max(rewards) if rewards else None,
        "eos_rate": sum(s["eos"] for s in flat) / len(flat),
        "completion_tokens": sum(len(s["completion_ids"]) for s in flat) / len(flat),
        "kl_to_initial": kl,
        "kl_to_initial_stderr": kl_stderr,
        **sample_summary(flat),
    }
