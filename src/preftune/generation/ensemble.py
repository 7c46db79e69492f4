"""A reward-model ensemble as one folder, loaded like a single reward model.

``rm train --ensemble K`` writes ``final/`` with an ``ensemble.json`` naming its kind and members:

    kind   final/ holds                                              scoring a batch costs
    full   member-00/ … member-KK/: K reward-model folders           K forwards, K models in memory
    heads  one reward model with K outputs (one head per member)    1 forward, 1 model
    lora   base/ (the starting reward model) and member-00/ …       K forwards, 1 model + K adapters
           member-KK/: peft adapters, each with its own head

Every kind answers :meth:`EnsembleScorer.columns` (each member's reward) and, as a
:class:`~.scoring.Scorer`, the aggregate of :mod:`.aggregate` (``mean``, ``min``,
``mean_minus_std``). Members of one folder share a tokenizer (they start from one model), so each
completion is tokenized once and every member reads the same batches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import Text
from ..data.files import write_json
from ..errors import ModelLoadError
from ..model.reward_head import sequence_rewards
from .aggregate import AGGREGATES, Scores, aggregate_rows
from .scoring import Forward, RewardModelScorer, load_reward_model_folder

MANIFEST = "ensemble.json"
KINDS = ("full", "heads", "lora")


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_manifest(folder: Path, kind: str, members: Sequence[str], **extra: Any) -> Path:
    """``folder/ensemble.json``: the kind, the members (subfolders; for ``heads``, output names)
    and whatever else describes the ensemble (seeds, bootstrap, accuracies)."""
    manifest = {"format": "preftune-reward-ensemble", "version": 1, "kind": kind, "members": list(members)}
    return write_json(folder / MANIFEST, manifest | extra)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """``ensemble.json``, checked: a known kind, at least two members, their folders present."""
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        kind, members = manifest["kind"], manifest["members"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{folder / MANIFEST}: not a reward-ensemble manifest ({err})") from None
    if kind not in KINDS or not isinstance(members, list) or len(members) < 2:
        raise ModelLoadError(
            f"{folder / MANIFEST}: kind must be one of {', '.join(KINDS)} with two members or more, "
            f"got kind {kind!r} and {members!r}"
        )
    subfolders = [folder / name for name in members] + ([folder / "base"] if kind == "lora" else [])
    missing = [str(p) for p in subfolders if kind != "heads" and not p.is_dir()]
    if missing:
        raise ModelLoadError(f"{folder}: the ensemble's member folder {missing[0]} is missing")
    return dict(manifest)


class EnsembleScorer:
    """An ensemble folder as a scorer: ``__call__`` answers the aggregate, :meth:`detail` the
    members' rewards beside it."""

    def __init__(
        self,
        path: str,
        aggregate: str = "mean",
        uncertainty_penalty: float = 1.0,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        max_length: int | None = None,
        progress: bool = False,
    ):
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate: one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.name, self.aggregate, self.uncertainty_penalty = path, aggregate, uncertainty_penalty
        self.manifest = read_manifest(path)
        self.kind, self.members = self.manifest["kind"], list(self.manifest["members"])
        folder, k = Path(path), len(self.members)
        options: dict[str, Any] = {"batch_size": batch_size, "device": device, "max_length": max_length}
        options["progress"] = progress
        if self.kind == "heads":
            # One model with K outputs: the base scorer's one forward gives every member.
            self.reader = RewardModelScorer(path, outputs=k, **options)
            self.models = [self.reader.model]
            self.forwards = [self.reader.forward(self.reader.model)]
        elif self.kind == "full":
            self.reader = RewardModelScorer(str(folder / self.members[0]), **options)
            self.models = [self.reader.model] + [self._member(folder / m) for m in self.members[1:]]
            self.forwards = [self.reader.forward(model) for model in self.models]
        else:
            self.reader = RewardModelScorer(str(folder / "base"), **options)
            self.forwards = lora_forwards(self.reader, folder, self.members)
            self.models = [self.reader.model]  # the base, every adapter in it

    def _member(self, path: Path) -> Any:
        tokenizer, model = load_reward_model_folder(str(path), self.reader.device)
        if tokenizer.get_vocab() != self.reader.tokenizer.get_vocab():
            raise ModelLoadError(f"{path}: its tokenizer differs from {self.members[0]}'s; members share one")
        return model

    def columns(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[list[float]]:
        """``[N][K]`` each member's reward of each completion."""
        return self.reader.columns(prompts, completions, self.forwards)

    def detail(self, prompts: Sequence[Text], completions: Sequence[Text]) -> Scores:
        return aggregate_rows(self.columns(prompts, completions), self.aggregate, self.uncertainty_penalty)

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        return self.detail(prompts, completions).rewards


def lora_forwards(reader: RewardModelScorer, folder: Path, members: list[str]) -> list[Forward]:
    """One forward per adapter of a ``lora`` ensemble, all on the reader's base model: each selects
    its adapter (and the head peft keeps beside it) before it runs."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError(f"{folder}: a LoRA ensemble needs peft (pip install 'preftune[lora]')") from None
    model = PeftModel.from_pretrained(reader.model, str(folder / members[0]), adapter_name=members[0])
    for name in members[1:]:
        model.load_adapter(str(folder / name), adapter_name=name)
    model.eval()
    reader.model = model

    def forward(name: str) -> Forward:
        def run(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            model.set_adapter(name)
            return sequence_rewards(model, input_ids.to(reader.device), mask.to(reader.device))

        return run

    return [forward(name) for name in members]
