"""LD-DPO and WPO against TRL 1.16's ``DPOTrainer._compute_loss``, from per-token values.

Both read more than per-sequence sums: LD-DPO splits each completion at the shorter completion's
length, WPO needs each token's ``log Σ_v p(v)²``. Random per-token log-probs (policy and
reference) and ``log Σ p²`` values go two ways:

* preftune: a real padded :class:`~preftune.data.layouts.Batch` (its ``label_tail``), the reduction the
  chunked path ends with (:func:`~preftune.model.logps.sequence_sums`), ``pair_stats`` of the recipe
  and the objective;
* TRL: the same values on its shifted ``[rows, T − 1]`` grid, from a fake policy and a fake live
  reference (so TRL splits the reference's tokens itself), one pair per call.
"""

from __future__ import annotations

import pytest
import torch
from trl_fakes import FakeModel, trl_compute_loss

from preftune.config import ObjectiveConfig
from preftune.data import TokenizedPair
from preftune.data.layouts import Batch, collate_pairs
from preftune.losses import build_objective
from preftune.model.logps import LogpsRequest, sequence_sums
from preftune.recipes.dpo import logps_request, pair_stats

DTYPE = torch.float64
ATOL = 1e-6
PAIRS = 6


class TokenData:
    """``PAIRS`` pairs of random lengths; per sequence, random per-token values in label order."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, 10, (2, PAIRS), generator=g)
        pairs = [
            TokenizedPair([1], [5] * int(lengths[0, i]), [6] * int(lengths[1, i]), index=i)
            for i in range(PAIRS)
        ]
        self.batch: Batch = collate_pairs(pairs, pad_token_id=0)
        self.lengths = torch.cat([lengths[0], lengths[1]])  # per sequence: chosen ones, then rejected
        n = int(self.lengths.sum())
        self.policy = -(0.05 + 4 * torch.rand(n, generator=g, dtype=DTYPE))
        self.reference = -(0.05 + 4 * torch.rand(n, generator=g, dtype=DTYPE))
        self.log_sum_sq = -(0.1 + 3 * torch.rand(n, generator=g, dtype=DTYPE))

    def ours(self, config: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, objective = self.batch, build_objective(config)
        token_stats = {"log_sum_sq": self.log_sum_sq} if objective.needs_wpo else {}
        policy = sequence_sums(self.policy, token_stats, b, logps_request(objective))
        reference = sequence_sums(self.reference, {}, b, LogpsRequest(masks=("label_tail",)))
        out = objective(pair_stats(policy, reference.logps, b, reference.masked_logps["label_tail"]))
        return out.losses, out.chosen_rewards, out.rejected_rewards

    def _grid(self, values: torch.Tensor, i: int) -> torch.Tensor:
        """Pair i's values on TRL's shifted grid: rows (chosen, rejected), one prompt token."""
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        rows = [i, PAIRS + i]
        grid = torch.zeros(2, int(self.lengths[rows].max()) + 1, dtype=DTYPE)
        for row, sequence in enumerate(rows):
            length, start = int(self.lengths[sequence]), int(starts[sequence])
            grid[row, :length] = values[start : start + length]
        return grid

    def trl(self, i: int, loss_types: list[str], **options: object) -> tuple[float, dict[str, float]]:
        lengths = self.lengths[[i, PAIRS + i]]
        positions = torch.arange(int(lengths.max()) + 2)
        attention_mask = (positions <= lengths[:, None]).long()
        inputs = {
            "input_ids": 7 * attention_mask,
            "attention_mask": attention_mask,
            "completion_mask": ((positions >= 1) & (positions <= lengths[:, None])).long(),
        }
        policy = FakeModel(self._grid(self.policy, i), self._grid(self.log_sum_sq, i))
        reference = FakeModel(self._grid(self.reference, i))
        return trl_compute_loss(inputs, policy, loss_types, ref_model=reference, **options)  # type: ignore[arg-type]


def test_the_fake_batches_agree_on_every_sequence_and_have_tails():
    """Guard: our label order and TRL's grid hold the same tokens; most pairs differ in length."""
    data = TokenData(seed=0)
    policy = sequence_sums(data.policy, {}, data.batch, LogpsRequest())
    for i in range(PAIRS):
        grid = data._grid(data.policy, i)
        torch.testing.assert_close(grid.sum(1), policy.logps[[i, PAIRS + i]], rtol=0, atol=1e-12)
    assert (data.lengths[:PAIRS] != data.lengths[PAIRS:]).sum() >= PAIRS // 2


# objective names, ObjectiveConfig values (TRL gets beta, weights, ld_alpha, use_weighting as its own).
CASES = [
    (["sigmoid"], {"beta": 0.1, "ld_alpha": 0.5}),
    (["sigmoid"], {"beta": 0.3, "ld_alpha": 0.0}),
    (["ipo"], {"beta": 0.5, "ld_alpha": 0.3}),
    (["hinge"], {"beta": 0.2, "ld_alpha": 0.7}),
    (["apo_zero"], {"beta": 0.2, "ld_alpha": 0.5}),
    (["sigmoid", "sft"], {"beta": 0.1, "ld_alpha": 0.5, "weights": [1.0, 0.4]}),
    (["sigmoid"], {"beta": 0.1, "wpo": True}),
    (["ipo"], {"beta": 0.5, "wpo": True}),
    (["sft"], {"beta": 0.1, "wpo": True}),
    (["sigmoid", "sft"], {"beta": 0.1, "wpo": True, "weights": [1.0, 0.4]}),
    (["sigmoid"], {"beta": 0.2, "wpo": True, "ld_alpha": 0.5}),
    (["robust"], {"beta": 0.1, "wpo": True, "ld_alpha": 0.2, "label_smoothing": 0.1}),
]


def _case_id(case: tuple[list[str], dict]) -> str:
    return "+".join(case[0]) + "-" + "-".join(f"{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("loss, kw", CASES, ids=[_case_id(c) for c in CASES])
def test_ld_dpo_and_wpo_per_pair_losses_and_rewards_match_trl(loss, kw):
    data = TokenData(seed=len(_case_id((loss, kw))))
    losses, chosen_rewards, rejected_rewards = data.ours(ObjectiveConfig(loss=loss, **kw))
    for i in range(PAIRS):
        trl_loss, metrics = data.trl(
            i,
            loss,
            beta=kw["beta"],
            loss_weights=kw.get("weights"),
            label_smoothing=kw.get("label_smoothing", 0.0),
            ld_alpha=kw.get("ld_alpha"),
            use_weighting=kw.get("wpo", False),
        )
        assert losses[i].item() == pytest.approx(trl_loss, rel=0, abs=ATOL), f"pair {i}"
        assert chosen_rewards[i].item() == pytest.approx(metrics["rewards/chosen"], rel=0, abs=ATOL)
        assert rejected_rewards[i].item() == pytest.approx(metrics["rewards/rejected"], rel=0, abs=ATOL)


@pytest.mark.parametrize("option", [{"ld_alpha": 0.5}, {"wpo": True}])
def test_each_option_changes_the_losses_of_these_pairs(option):
    """Guard: LD-DPO and WPO are not no-ops on the data compared above."""
    data = TokenData(seed=3)
    plain = data.ours(ObjectiveConfig(loss=["sigmoid"]))[0]
    changed = data.ours(ObjectiveConfig(loss=["sigmoid"], **option))[0]  # type: ignore[arg-type]
    assert (changed - plain).abs().max() > 1e-3
