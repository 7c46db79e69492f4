"""Reference strategies: one small interface, ``logps(batch) -> [S]``, a log-prob per sequence
(``logps_and_tails`` adds the sums over the batch's LD-DPO tails from the same forward).

Like the policy's, the reference's statistics are per sequence; the batch's layout says
which sequence is which pair's chosen or rejected completion.


* :class:`ModelReference`      a frozen model: a copy of the starting policy or another checkpoint
* :class:`AdapterOffReference` the policy's own weights with its LoRA adapters disabled
* :class:`PrecomputedReference` log-probs computed in one pass before training and cached on
  disk with a fingerprint of model + data + tokenization; reused when it matches, refused
  when it does not
* reference-free objectives get no reference at all (``None``): no forward is spent on it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data import TokenizedPair
from ..data.layouts import Batch, SequenceBatch
from ..data.packing import collate_for
from ..data.store import pair_indices, pair_lengths
from ..distributed import on_main, process_group
from ..errors import ConfigError, ReferenceCacheError
from .attention import choose_layout
from .load import freeze as freeze_model
from .logps import LogpsRequest, PolicyLogps, SequenceLogps
from .quantize import is_quantized, quantization_device, quantized

__all__ = ["Placement", "Reference", "ReferenceCacheError", "build_reference"]

TAILS = "label_tail"
"""The batch's per-token mask whose log-prob sums :meth:`Reference.logps_and_tails` adds."""


@dataclass(frozen=True)
class Placement:
    """Where this process runs a model: its ``device``, the ``autocast`` context of the run's mixed
    precision, whether it is the main process (the one that prints and writes files) and, when
    the policy's weights are sharded (FSDP2, ZeRO-3), ``shard``: how a live reference is sharded
    the same way (it takes the module whose forward gives the log-probs and returns the one to
    call, each process holding its shards; every call is then a collective). The defaults: one
    process on the CPU, no mixed precision, nothing sharded."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    is_main: bool = True
    shard: Callable[[nn.Module], nn.Module] | None = None


class Reference(Protocol):
    def logps(self, batch: Batch) -> Tensor:
        """``[S]`` summed completion log-probs of every sequence of the batch."""
        ...

    def logps_and_tails(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """:meth:`logps` and ``[S]`` the sums over the tokens of ``batch.label_tail`` (LD-DPO)."""
        ...


class _ModelLogps:
    """A model's log-probs without gradients, inside ``model_context`` (what makes it the reference).

    They are the forward of ``module`` (:class:`~preftune.model.logps.PolicyLogps` around ``model``):
    when the reference is sharded (FSDP2, ZeRO-3) that module is the sharded root, whose call
    gathers the embeddings and the lm_head the chunked head reads, as the policy's does.
    """

    model: nn.Module
    module: nn.Module

    def model_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _sequences(self, batch: Batch | SequenceBatch, tails: bool) -> SequenceLogps:
        with torch.no_grad(), self.model_context():
            sequences: SequenceLogps = self.module(batch, only_logps=not tails)
            return sequences

    def logps(self, batch: Batch | SequenceBatch) -> Tensor:
        """Also of single sequences (KTO's examples and KL sequences), which only a live model scores."""
        return self._sequences(batch, tails=False).logps

    def logps_and_tails(self, batch: Batch) -> tuple[Tensor, Tensor]:
        sequences = self._sequences(batch, tails=True)
        return sequences.logps, sequences.masked_logps[TAILS]


class ModelReference(_ModelLogps):
    """A frozen model in eval mode, never updated."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None, freeze: bool = True):
        self.model = freeze_model(model) if freeze else model
        self.module = _logps_module(self.model, chunk_size)


class AdapterOffReference(_ModelLogps):
    """The policy's base weights: the PEFT model with adapters disabled. No second model in memory."""

    def __init__(self, peft_model: nn.Module, chunk_size: int | None = None):
        self.model = peft_model
        self.module = _logps_module(peft_model, chunk_size)

    def model_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.model.disable_adapter()  # type: ignore[operator]


def _logps_module(model: nn.Module, chunk_size: int | None) -> nn.Module:
    """The log-probs, with the sums over the batch's tails unless ``only_logps``."""
    return PolicyLogps(model, LogpsRequest(masks=(TAILS,)), chunk_size)


class PrecomputedReference:
    """Reference log-probs looked up by the pairs' dataset index, placed where the layout says.

    ``tables`` holds ``[max index + 1]`` tensors: ``chosen``, ``rejected`` and, when cached,
    ``chosen_tail``, ``rejected_tail`` (the sums over LD-DPO's tails).
    """

    def __init__(self, tables: dict[str, Tensor]):
        self.tables = tables

    def _lookup(self, batch: Batch, chosen: str, rejected: str) -> Tensor:
        device = batch.pair_index.device
        if self.tables[chosen].device != device:  # once: the tables move to the batch's device
            self.tables = {name: table.to(device) for name, table in self.tables.items()}
        out = torch.empty(batch.num_sequences, device=device)
        out[batch.chosen] = self.tables[chosen][batch.pair_index]
        out[batch.rejected] = self.tables[rejected][batch.pair_index]
        return out

    def logps(self, batch: Batch) -> Tensor:
        return self._lookup(batch, "chosen", "rejected")

    def logps_and_tails(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return self.logps(batch), self._lookup(batch, "chosen_tail", "rejected_tail")


# --------------------------------------------------------------------------- precompute and cache


TABLES = ("chosen", "rejected", "chosen_tail", "rejected_tail")


@dataclass(frozen=True)
class Batching:
    """How pairs become batches: ``size`` pairs a batch in ``layout`` (packed rows of at most
    ``pack_tokens`` tokens), padded with ``pad_token_id``."""

    pad_token_id: int
    size: int
    layout: str = "padded"
    pack_tokens: int | None = None

    def collate(self) -> Callable[[Sequence[TokenizedPair]], Batch]:
        return collate_for(self.layout, self.pad_token_id, self.pack_tokens)


def precompute(
    reference: Reference,
    pairs: Sequence[TokenizedPair],
    batching: Batching,
    placement: Placement = Placement(),
    progress: bool = True,
) -> dict[str, Tensor]:
    """One pass over ``pairs``; returns :class:`PrecomputedReference`'s tables, ``[max index + 1]``
    tensors indexed by ``pair.index``: the sums and the sums over the batch's tails (cheap to keep).
    Batches as ``batching`` says, the run's layout (a packed or prefix-shared row computes each
    prompt once; the tables are the padded layout's, to float rounding).

    Under a launched group (``torchrun``, ``accelerate launch``) each process computes every
    n-th pair of the longest-first order (so the shares cost alike) and the shares are gathered:
    every process returns all the tables, each pair computed once.
    """
    rank, world = process_group()
    size = int(pair_indices(pairs).max()) + 1
    tables = {name: torch.full((size,), float("nan")) for name in TABLES}
    # Longest first: the first batch shows an out-of-memory at once, not at the end. Sorted by
    # the lengths alone: a stored dataset's pairs are built only when their batch comes.
    ordered = np.argsort(-pair_lengths(pairs), kind="stable")
    share = ordered[rank::world]
    starts = range(0, len(share), batching.size)
    collate = batching.collate()
    for start in tqdm(starts, desc="reference log-probs", disable=None if progress else True, leave=False):
        batch = collate([pairs[int(i)] for i in share[start : start + batching.size]]).to(placement.device)
        with placement.autocast():
            sums, tails = (t.float().cpu() for t in reference.logps_and_tails(batch))
        keys, chosen, rejected = batch.pair_index.cpu(), batch.chosen.cpu(), batch.rejected.cpu()
        tables["chosen"][keys], tables["rejected"][keys] = sums[chosen], sums[rejected]
        tables["chosen_tail"][keys], tables["rejected_tail"][keys] = tails[chosen], tails[rejected]
    if world > 1:
        keys = torch.from_numpy(pair_indices(pairs)[share]).long()
        shares: list[Any] = [None] * world
        torch.distributed.all_gather_object(shares, (keys, {name: t[keys] for name, t in tables.items()}))
        for keys, values in shares:
            for name, table in tables.items():
                table[keys] = values[name]
    return tables


def _param_digest(model: nn.Module, skip: str | None = None) -> str:
    """Names, shapes, dtypes and a strided sample of every parameter: cheap even at 70B,
    and any fine-tune or different checkpoint changes it."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if skip and skip in name:
            continue
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride][:4096].float().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def weights_digest(*models: nn.Module | None) -> str:
    """A digest of the models' weights, LoRA adapters left out (they are what training changes)."""
    digest = hashlib.sha256()
    for model in models:
        if model is not None:
            digest.update(_param_digest(model, skip="lora_").encode())
    return digest.hexdigest()[:32]


def fingerprint(model: nn.Module, pairs: Sequence[TokenizedPair], extra: dict[str, Any]) -> str:
    """A hash of the reference weights, the pairs' token ids (a tokenized store's own key, which
    names its ids, rather than every id hashed again) and the settings that change log-probs."""
    digest = hashlib.sha256()
    digest.update(_param_digest(model).encode())
    stored = getattr(pairs, "fingerprint", None)
    if isinstance(stored, str):
        digest.update(stored.encode())
    else:
        for pair in pairs:
            digest.update(
                json.dumps([pair.index, pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode()
            )
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ReferenceCache:
    """The file that keeps precomputed tables between runs. It serves a run whose fingerprint
    matches: the reference weights (``model``), every pair's token ids and ``settings`` (what else
    changes log-probs: dtype, mixed precision)."""

    path: Path
    model: nn.Module
    settings: dict[str, Any]
    replace_stale: bool = False
    """Recompute a file that does not serve rather than refuse it: the run replaces the one that
    wrote it (``train.overwrite``)."""
    needs_tails: bool = False
    """The objective reads the sums over the batch's tails (LD-DPO): a file without them does not serve."""

    def read(self, pairs: Sequence[TokenizedPair]) -> dict[str, Tensor] | None:
        """The cached tables when the file serves these pairs; None when there is no file, or one
        to replace; raises :class:`ReferenceCacheError` when it does not serve."""
        if not self.path.exists():
            return None
        try:
            cached = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ReferenceCacheError(f"{self.path}: unreadable ({err}); delete it to recompute") from None
        key = fingerprint(self.model, pairs, self.settings)
        if cached.get("fingerprint") != key and not self.replace_stale:
            raise ReferenceCacheError(
                f"{self.path}: reference log-probs were computed for another model, data or tokenization "
                f"(fingerprint {cached.get('fingerprint')} != {key}); delete the file to recompute them, "
                "or use another train.output_dir"
            )
        complete = not self.needs_tails or set(TABLES) <= set(cached)
        if not complete and not self.replace_stale:
            raise ReferenceCacheError(
                f"{self.path}: holds no sums over LD-DPO's tails (cached by an earlier version); "
                "delete the file to recompute it"
            )
        if cached.get("fingerprint") == key and complete:
            return {name: cached[name] for name in TABLES if name in cached}
        return None

    def write(self, pairs: Sequence[TokenizedPair], tables: dict[str, Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        torch.save({"fingerprint": fingerprint(self.model, pairs, self.settings), **tables}, tmp)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a cache


def load_or_precompute(
    cache: ReferenceCache,
    source: Reference,
    pairs: Sequence[TokenizedPair],
    batching: Batching,
    placement: Placement = Placement(),
    progress: bool = True,
) -> PrecomputedReference:
    """The tables of ``cache`` when it serves these pairs (it refuses when it does not), else the
    tables :func:`precompute` computes with ``source``, then cached.

    Under a launched group the main process alone reads and writes the cache (its verdict, its
    tables or its error reach every process), and the pairs are computed shared out
    (:func:`precompute`): nothing needs a file system the processes share.
    """
    say: Callable[[str], None] = print if placement.is_main else (lambda message: None)

    def reuse() -> dict[str, Tensor] | None:
        tables = cache.read(pairs)
        if tables is not None:
            say(f"reference log-probs: reusing {cache.path}")
        return tables

    reused = on_main(reuse, ReferenceCacheError)
    if reused is not None:
        return PrecomputedReference(reused)
    tables = precompute(source, pairs, batching, placement, progress)

    def write() -> None:
        cache.write(pairs, tables)
        say(
            f"reference log-probs: computed for {len(pairs)} pairs ({batching.layout} layout), cached in {cache.path}"
        )

    on_main(write, ReferenceCacheError)  # the others wait for it, and stop with its error
    return PrecomputedReference(tables)


def choose_strategy(
    cfg: RunConfig, needs_reference: bool, policy_is_peft: bool, has_model: bool = False
) -> str:
    """``auto`` -> none (reference-free), adapter (LoRA, no other checkpoint given), else copy."""
    strategy = cfg.reference.strategy
    if not needs_reference:
        return "none"
    if strategy == "none":
        raise ConfigError("reference.strategy: 'none' but the objective needs a reference")
    if strategy == "auto":
        return "adapter" if policy_is_peft and not (cfg.reference.path or has_model) else "copy"
    return strategy


def build_reference(
    config: RunConfig,
    needs_reference: bool,
    policy: nn.Module,
    reference_model: nn.Module | None,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    placement: Placement,
) -> tuple[Reference | None, str]:
    """The reference the objective needs, per ``config.reference``; returns it and the strategy used.

    A live reference is placed as ``placement`` says: under FSDP2 or ZeRO-3 sharded as the
    policy is, the whole model never going to the device. A precomputed one reads ``pairs``."""
    from .load import is_peft, load_model

    chunk = config.train.logps_chunk_size
    strategy = choose_strategy(config, needs_reference, is_peft(policy), reference_model is not None)
    if strategy == "none":
        return None, strategy
    if strategy == "adapter":
        return AdapterOffReference(policy, chunk), strategy
    if reference_model is None and config.reference.path:
        reference_model = load_model(config.model, config.reference.path, config.reference.quantize)
    source_model = reference_model
    if source_model is None and strategy == "precomputed":
        source_model = policy  # precomputing reads the starting policy once
    elif source_model is None or (config.reference.quantize != "none" and not is_quantized(source_model)):
        # A live reference needs its own frozen copy (quantized: made without a full-precision one).
        source_model = live_copy(config, source_model or policy, placement.device)
    live_shard = placement.shard if strategy == "copy" else None  # precomputing reads the whole model
    if live_shard is not None and is_peft(source_model):
        raise ConfigError(
            "reference: a LoRA model (the policy's copy, or reference.path) cannot be sharded under FSDP2 "
            "or DeepSpeed ZeRO-3 yet; use DDP (examples/accelerate/ddp.yaml), a merged reference.path, or "
            "reference.strategy=precomputed"
        )
    if live_shard is None and not is_quantized(source_model):  # bitsandbytes placed it as it loaded
        source_model.to(placement.device)
    source: AdapterOffReference | ModelReference
    if is_peft(source_model):
        source = AdapterOffReference(source_model, chunk)
    else:  # freezing the policy itself would stop its training
        source = ModelReference(source_model, chunk, freeze=source_model is not policy)
    if strategy == "copy":
        if live_shard is not None:
            source.module = live_shard(source.module)
        return source, strategy
    precomputed = _precomputed(config, source, pairs, pad_token_id, placement, policy)
    if source_model is not policy and not is_quantized(source_model):
        source_model.to("cpu")  # the tables are all training needs: free the device
    return precomputed, strategy


def _precomputed(
    config: RunConfig,
    source: AdapterOffReference | ModelReference,
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    placement: Placement,
    policy: nn.Module,
) -> PrecomputedReference:
    """``source``'s tables, from ``train.output_dir``'s cache when it serves, else computed."""
    cache = ReferenceCache(
        Path(config.train.output_dir) / "reference_logps.pt",
        source.model,
        {
            "dtype": str(next(source.model.parameters()).dtype),
            "mixed_precision": config.train.mixed_precision,
        },
        replace_stale=config.train.overwrite,
        needs_tails=config.objective.ld_alpha is not None,
    )
    # The layout training would choose for this model; not in the fingerprint: every layout
    # gives the same log-probs, so a cache serves a run with another layout.
    layout, notice = choose_layout(config.data.layout, source.model, device_type=placement.device.type)
    if notice and placement.is_main and source.model is not policy:  # the policy's own notice says it
        print(f"reference log-probs: {notice}")
    batching = Batching(pad_token_id, config.reference.batch_size, layout, config.data.pack_tokens)
    return load_or_precompute(
        cache, source, pairs, batching, placement, config.train.progress and placement.is_main
    )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of the starting policy (a PEFT policy is copied with its adapters,
    and used with them disabled)."""
    return freeze_model(copy.deepcopy(model))


def live_copy(config: RunConfig, model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A frozen copy of ``model`` to serve as a live reference: quantized as ``reference.quantize``
    says (from ``model``'s weights, with no full-precision copy on the way; a PEFT model's base
    weights, its adapters off), else a deep copy."""
    from .load import resolve_dtype

    kind = config.reference.quantize
    if kind == "none":
        return frozen_copy(model)
    return quantized(model, kind, resolve_dtype(config.model), device or quantization_device())


def reference_model(config: RunConfig, policy: nn.Module) -> nn.Module | None:
    """The frozen model a live token-level reference runs (PPO): ``reference.path``, else a copy of
    the starting policy, each quantized as ``reference.quantize`` says; None with LoRA, whose
    reference is the policy with its adapters off."""
    from .load import is_peft, load_model

    if is_peft(policy) or config.model.lora or config.model.load_in_4bit:
        return None
    path = config.reference.path
    if path:
        return freeze_model(load_model(config.model, path, config.reference.quantize))
    return live_copy(config, policy)
