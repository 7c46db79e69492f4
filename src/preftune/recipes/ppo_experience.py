"""PPO's rollout phase and its models: sample, score, and compute under ``no_grad`` everything the
updates compare against (log π_old, log π_ref, V_old), then the rewards and advantages.

Token-level log-probs come from the chunked head (:func:`preftune.model.logps.sequence_logps`, no
full-vocabulary logits) at the sampling temperature, so the ratio π/π_ref and the KL penalty are
those of the distribution the completions were drawn from.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..config import RunConfig
from ..data.layouts import SequenceBatch, collate_sequences
from ..data.prompts import Prompt
from ..data.sft import TokenizedSequence
from ..errors import ConfigError, ScorerError
from ..generation.rollout import Rollout
from ..generation.sampling import sample_summary, score_samples
from ..generation.scoring import RewardModelScorer, Scorer
from ..losses.ppo import explained_variance, gae, kl_penalty, masked_mean, token_rewards, whiten
from ..model.load import load_reward_model
from ..model.logps import LogpsRequest, SequenceLogps, sequence_logps
from ..model.reward_head import critic_from_causal_lm, token_values


@dataclass
class Experience:
    """One step's completions and what the updates read; per-token tensors are ``[S, L]``
    (:mod:`preftune.losses.ppo`'s layout), on the training device."""

    sequences: list[TokenizedSequence]
    """prompt + completion ids, the loss mask on the completion (what the updates collate)."""
    counts: list[int]
    """Completion tokens of each sequence."""
    mask: Tensor
    logps: Tensor
    ref_logps: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    metrics: dict[str, float]

    def rows(self, index: Sequence[int]) -> list[TokenizedSequence]:
        return [self.sequences[i] for i in index]

    def tokens(self, index: Sequence[int]) -> dict[str, Tensor]:
        """The stored per-token values of sequences ``index``, flat in a collated batch's
        ``label_index`` order (each sequence's tokens left to right)."""
        where = torch.as_tensor(list(index), device=self.mask.device)
        mask = self.mask[where].bool()
        return {
            name: getattr(self, name)[where][mask] for name in ("logps", "values", "advantages", "returns")
        }


def as_rows(flat: Tensor, counts: Tensor) -> Tensor:
    """``[N]`` per-token values (each sequence's tokens in turn) -> ``[S, L]``, zero-padded."""
    width = int(counts.max().item()) if counts.numel() else 0
    mask = torch.arange(width, device=flat.device)[None, :] < counts.to(flat.device)[:, None]
    out = flat.new_zeros(mask.shape)
    out[mask] = flat
    return out


def policy_tokens(
    model: nn.Module, batch: SequenceBatch, temperature: float, chunk: int | None
) -> SequenceLogps:
    """Each completion token's log-prob (``token_logps``) and each sequence's summed entropy
    (``stats["entropy"]``), under ``logits / temperature``."""
    return sequence_logps(
        model, batch, LogpsRequest(stats=("entropy",), per_token=True, temperature=temperature), chunk
    )


def reference_context(
    policy: nn.Module, reference: nn.Module | None
) -> contextlib.AbstractContextManager[Any]:
    """LoRA: the reference is the policy with its adapters off; otherwise a frozen model."""
    return policy.disable_adapter() if reference is None else contextlib.nullcontext()  # type: ignore[operator]


def chunks(count: int, size: int) -> Iterator[list[int]]:
    for start in range(0, count, size):
        yield list(range(start, min(start + size, count)))


@dataclass
class PPOModels:
    """What PPO's rollout phase runs: the models, the sampler and the reward."""

    policy: nn.Module
    critic: nn.Module
    reference: nn.Module | None
    """None: the policy with its LoRA adapters off."""
    sampler: Rollout
    scorer: Scorer
    tokenizer: Any
    monitor: Scorer | None = None
    """Scores the same completions for the record (never trained on): the overoptimization monitor."""


@torch.no_grad()
def collect(
    config: RunConfig,
    step: int,
    prompts: list[Prompt],
    models: PPOModels,
    kl_coef: float,
    accelerator: Accelerator,
) -> Experience:
    """Step ``step``'s experience: one completion per prompt, its score, and the rewards (with the
    penalty ``−kl_coef·KL_t``) and advantages."""
    ppo, device = config.ppo, accelerator.device
    # sample and score
    completions = models.sampler.generate(
        [p.ids for p in prompts], config.rollout, seed=step_seed(config.train.seed, step), desc=f"step {step}"
    )
    scores, watched = score(prompts, completions, models, config.rollout.missing_eos_penalty)
    scores = scores.to(device)
    sequences = [
        TokenizedSequence([*p.ids, *c.ids], [0] * len(p.ids) + [1] * len(c.ids), i, p.where)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    counts = torch.tensor([len(c.ids) for c in completions])

    # log π_old, log π_ref and V_old per token, as the updates will compare against them
    rows, entropy = old_tokens(config, sequences, counts, models, accelerator)
    mask = as_rows(torch.ones(int(counts.sum())), counts).to(device)

    # rewards and advantages
    kl = kl_penalty(rows["logps"], rows["ref_logps"], ppo.kl_estimator) * mask
    rewards = token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = gae(rewards, rows["values"], mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        advantages = whiten(advantages, mask)

    # metrics
    non_score = (-kl_coef * kl).sum(dim=1)
    ended = torch.tensor([c.ended for c in completions], dtype=torch.float32)
    metrics = {
        "objective/scores": scores.mean().item(),
        "objective/kl": kl.sum(dim=1).mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scores + non_score).mean().item(),
        "objective/entropy": entropy.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/eos_rate": ended.mean().item(),
        "objective/completion_tokens": counts.float().mean().item(),
        "val/explained_variance": explained_variance(rows["values"], returns, mask),
        "val/mean": masked_mean(rows["values"], mask).item(),
        **watched,
    }
    return Experience(
        sequences, counts.tolist(), mask, **rows, advantages=advantages, returns=returns, metrics=metrics
    )


MONITOR_SEM = "monitor_sem"
"""The standard error of a step's monitor mean: read by the monitor's noise rule, not logged."""


def score(
    prompts: list[Prompt], completions: list[Any], models: PPOModels, penalty: float | None
) -> tuple[Tensor, dict[str, float]]:
    """``[S]`` each completion's reward, minus ``penalty`` where it did not end with EOS; and what
    is logged beside it: the members' disagreement (``objective/scores_disagreement``, an
    ensemble's) and the monitor's mean reward (``objective/monitor_scores``). A completion left
    unscored stops the run, naming its prompt."""
    scored = score_samples(prompts, 1, completions, models.scorer, models.tokenizer, penalty, models.monitor)
    unscored = [prompts[i].where for i, s in enumerate(scored) if s["reward"] is None]
    if unscored:
        raise ScorerError(
            f"{getattr(models.scorer, 'name', 'the reward')}: no finite score for {len(unscored)} of "
            f"{len(scored)} completions (first: the prompt of {unscored[0]}); PPO needs a reward for every "
            "completion"
        )
    summary = sample_summary(scored)
    logged = {
        "reward_disagreement": "objective/scores_disagreement",
        "monitor_mean": "objective/monitor_scores",
        "monitor_sem": MONITOR_SEM,
    }
    watched = {name: float(summary[key]) for key, name in logged.items() if summary.get(key) is not None}
    return torch.tensor([s["reward"] for s in scored], dtype=torch.float32), watched


def old_tokens(
    config: RunConfig,
    sequences: list[TokenizedSequence],
    counts: Tensor,
    models: PPOModels,
    accelerator: Accelerator,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per completion token, at the sampling temperature and in eval mode: ``logps`` (π_old),
    ``ref_logps`` (π_ref) and ``values`` (V_old), each ``[S, L]``; and ``[S]`` each sequence's
    summed entropy under π."""
    temperature, chunk = config.rollout.temperature, config.train.logps_chunk_size
    policy, reference, critic = models.policy, models.reference, models.critic
    flat: dict[str, list[Tensor]] = {"logps": [], "ref_logps": [], "values": [], "entropy": []}
    modes = [(model, model.training) for model in (policy, critic)]
    for model, _ in modes:
        model.eval()
    for index in chunks(len(sequences), config.train.batch_size):
        batch = collate_sequences([sequences[i] for i in index], models.tokenizer.pad_token_id)
        batch = batch.to(accelerator.device)
        with accelerator.autocast():
            ours = policy_tokens(policy, batch, temperature, chunk)
            with reference_context(policy, reference):
                theirs = policy_tokens(reference or policy, batch, temperature, chunk)
            flat["values"].append(token_values(critic, batch))
        flat["logps"].append(ours.token_logps)  # type: ignore[arg-type]
        flat["ref_logps"].append(theirs.token_logps)  # type: ignore[arg-type]
        flat["entropy"].append(ours.stats["entropy"])
    for model, training in modes:
        model.train(training)
    rows = {name: as_rows(torch.cat(values), counts) for name, values in flat.items() if name != "entropy"}
    return rows, torch.cat(flat["entropy"])


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed of its own for each step (and each of its shuffles): resuming at step k needs nothing
    else to draw what the uninterrupted run drew."""
    return (seed * 1_000_003 + step) * 101 + salt


# --------------------------------------------------------------------------- the models


def same_vocabulary(a: Any, b: Any) -> bool:
    return bool(a.get_vocab() == b.get_vocab())


def build_critic(
    config: RunConfig, policy: nn.Module, scorer: Scorer, tokenizer: Any, say: Any
) -> tuple[nn.Module, str]:
    """The value model ``ppo.value_model`` names, and a line saying what it is. Built from the
    policy before LoRA wraps it; the reward model is copied (training the critic never changes
    the reward)."""
    choice = config.ppo.value_model
    reward_model = scorer if isinstance(scorer, RewardModelScorer) else None
    if choice == "auto":
        usable = reward_model is not None and same_vocabulary(reward_model.tokenizer, tokenizer)
        choice = "reward" if usable else "policy"
    if choice == "reward":
        if reward_model is None:
            several = getattr(scorer, "members", None)
            raise ConfigError(
                "ppo.value_model: 'reward' needs reward.scorer to be a reward-model folder"
                + (
                    f"; {scorer.name} is an ensemble of {len(several)}, no one model to copy: use "
                    "ppo.value_model=policy or a reward-model folder (a member of a full ensemble is one)"
                    if several
                    else ""
                )
            )
        if not same_vocabulary(reward_model.tokenizer, tokenizer):
            raise ConfigError(
                f"ppo.value_model: the reward model {reward_model.name} reads another vocabulary than the "
                "policy, so it cannot value the policy's tokens; use ppo.value_model=policy"
            )
        return copy.deepcopy(reward_model.model).train(), f"the reward model {reward_model.name}"
    if choice == "policy":
        return critic_from_causal_lm(policy), "the policy's backbone with a new zero head"
    model_cfg = copy.deepcopy(config.model)
    model_cfg.name_or_path = choice
    critic: Any = load_reward_model(model_cfg, tokenizer.pad_token_id, say)
    if critic.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"ppo.value_model: {choice} has fewer token embeddings than the policy's vocabulary"
        )
    return critic, choice
