"""How ``preftune eval`` measures: the options of the command, which the pipeline's ``eval`` stage
and the experiments set too."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config.coerce import need


@dataclass(frozen=True)
class EvalSettings:
    """What is measured and how the forward passes and samples are batched."""

    beta: float = 0.1
    """β of the DPO-RM margin, ``β·((log π − log π_ref)(chosen) − (log π − log π_ref)(rejected))``."""
    samples: int = 0
    """Samples per prompt from the policy and from the reference (the KL estimate, the samples'
    rewards, the win rate); 0: none."""
    max_new_tokens: int = 128
    """Length limit of each sample."""
    seed: int = 0
    """Seed of the policy's samples; the reference's are drawn from ``seed + 1``."""
    batch_size: int = 8
    """Pairs per forward pass."""
    layout: str = "auto"
    """How pairs are batched (``data.layout``'s values; :func:`~preftune.model.set_logps.pair_logps`)."""
    progress: bool = False
    """Progress bars over the batches."""

    def __post_init__(self) -> None:
        # A negative batch or sample count once gave every metric as 0.0% with exit 0.
        need(
            math.isfinite(self.beta) and self.beta > 0,
            "eval.beta",
            f"must be a finite number > 0, got {self.beta}",
        )
        need(self.samples >= 0, "eval.samples", f"must be >= 0, got {self.samples}")
        need(self.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        need(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.seed >= 0, "eval.seed", f"must be >= 0, got {self.seed}")
