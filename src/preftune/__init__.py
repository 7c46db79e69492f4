"""preftune: align causal language models with preference data.

The pieces, from records to a trained policy::

    from preftune import load_config, train, train_reward_model
    config = load_config(overrides=["model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
                                    "data.path=pairs.jsonl", "objective.loss=dpo"])
    result = train(config)          # result.history, result.final_dir

    from preftune import PairStats, build_objective, ObjectiveConfig
    dpo = build_objective(ObjectiveConfig(loss=["dpo"], beta=0.1))
    out = dpo(PairStats(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                        ref_chosen_logps, ref_rejected_logps))   # out.losses: [B]
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `preftune losses` or `import preftune.data` stays quick.
_EXPORTS = {
    "ConfigError": "config",
    "ObjectiveConfig": "config",
    "RunConfig": "config",
    "load_config": "config",
    "DataError": "data",
    "TokenizedPair": "data",
    "prepare_pairs": "data",
    "sequence_logps": "model.logps",
    "LossOutput": "losses",
    "PairStats": "losses",
    "build_objective": "losses",
    "PreftuneError": "errors",
    "Harness": "engine",
    "Task": "engine",
    "TrainResult": "engine",
    "train": "recipes.dpo",
    "train_kto": "recipes.kto",
    "train_sft": "recipes.sft",
    "train_reward_model": "recipes.reward",
    "train_online": "recipes.online",
    "train_ppo": "recipes.ppo",
    "run_eval": "evaluation.run",
    "load_scorer": "generation.rewards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
