"""How ``preftune eval`` measures: the options of the command, which the pipeline's ``eval`` stage
and the experiments set too."""

from __future__ import annotations

from dataclasses import dataclass


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
