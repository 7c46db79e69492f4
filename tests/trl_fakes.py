"""TRL 1.16's ``DPOTrainer._compute_loss`` and ``KTOTrainer._compute_loss`` driven directly, for
the conformance tests.

The methods are called unbound with a minimal fake ``self`` carrying only the attributes they read,
and fake models that return per-token values the test chose (TRL's ``FusedCausalLMOutput`` fields
on its shifted ``[rows, T − 1]`` grid).
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

import torch
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer


class FakeModel:
    """Stands in for the policy (or the reference): returns the per-token values it was built with."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor | None = None):
        self._modules: dict[str, Any] = {}  # what accelerate's is_peft_model looks at
        self.per_token_logps = per_token_logps
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, **kwargs: Any) -> types.SimpleNamespace:
        lp = self.per_token_logps
        return types.SimpleNamespace(
            log_probs=lp,
            log_sum_sq_probs=self.log_sum_sq_probs,
            entropy=torch.ones_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
        )


def trl_compute_loss(
    inputs: dict[str, torch.Tensor],
    policy: FakeModel,
    loss_types: list[str],
    *,
    beta: float,
    ref_model: FakeModel | None = None,
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_divergence_alpha: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
) -> tuple[float, dict[str, float]]:
    """TRL's batch-mean loss and logged metrics. Without ``ref_model`` the reference's summed
    log-probs come precomputed in ``inputs`` (``ref_chosen_logps`` / ``ref_rejected_logps``)."""
    identity = lambda x: x  # noqa: E731
    fake_self = types.SimpleNamespace(
        model=policy,
        ref_model=ref_model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=ref_model is None,
        f_divergence_type=f_divergence,
        f_alpha_divergence_coef=f_divergence_alpha,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        use_weighting=use_weighting,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    loss = DPOTrainer._compute_loss(fake_self, policy, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in fake_self._metrics["train"].items()}
    return float(loss), metrics


def trl_kto_compute_loss(
    data: dict[str, torch.Tensor],
    loss_type: str,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    other_process_kl: torch.Tensor | None = None,
) -> tuple[float, dict[str, float]]:
    """TRL's KTO batch loss and logged metrics for examples with summed log-probs ``data["logps"]``
    (reference ``ref_logps``, precomputed as TRL's ``precompute_ref_log_probs`` stores them), KL
    sequences ``kl_logps`` / ``ref_kl_logps`` and labels ``desirable``. Each sequence is one token
    wide on TRL's shifted grid, so its row sum is the value given. With ``other_process_kl`` the
    first gather (TRL's of the KL estimate) also returns a second process's micro-batch estimate."""
    n = len(data["logps"])
    ids = torch.ones(n, 2, dtype=torch.long)
    kl_ids = torch.ones(n, 2, dtype=torch.long)
    rows = {id(ids): data["logps"], id(kl_ids): data["kl_logps"]}

    class Model(FakeModel):
        def __call__(self, **kwargs: Any) -> types.SimpleNamespace:
            self.per_token_logps = rows[id(kwargs["input_ids"])][:, None]
            return super().__call__(**kwargs)

    gathered: list[int] = []

    def gather_for_metrics(value: torch.Tensor) -> torch.Tensor:
        first = not gathered
        gathered.append(1)
        return (
            torch.stack([value, other_process_kl.to(value)])
            if first and other_process_kl is not None
            else value
        )

    fake_self = types.SimpleNamespace(
        model=Model(data["logps"][:, None]),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=gather_for_metrics),
        calculate_KL=loss_type != "apo_zero_unpaired",
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    fake_self._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(fake_self, model, batch)
    mask = torch.tensor([[0, 1]] * n)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_ids),
        "KL_completion_mask": mask,
        "label": data["desirable"],
        "ref_logps": data["ref_logps"],
        "ref_KL_logps": data["ref_kl_logps"],
    }
    loss = KTOTrainer._compute_loss(fake_self, fake_self.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in fake_self._metrics["train"].items()}
    return float(loss), metrics
