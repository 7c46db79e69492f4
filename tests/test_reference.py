"""Reference strategies give the same DPO numbers as an explicit frozen copy."""

import copy
import math

import pytest
import torch
from helpers import quiet_config, sentiment_records
from peft import LoraConfig, get_peft_model

import preftune.model.reference as reference_module
from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.data.layouts import collate_pairs
from preftune.errors import ConfigError
from preftune.experiments.synthetic import tiny_llama
from preftune.model.reference import AdapterOffReference, ModelReference, ReferenceCacheError, choose_strategy
from preftune.recipes.dpo import train

RECORDS = sentiment_records(12, seed=1)


def _batch(tokenizer):
    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    return collate_pairs(pairs, tokenizer.pad_token_id)


def test_adapter_disabled_reference_equals_an_explicit_base_copy(tokenizer):
    base = tiny_llama(len(tokenizer), seed=4)
    base_copy = copy.deepcopy(base)
    # init_lora_weights=False: adapters start non-zero, so "disabled" is observable.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _batch(tokenizer)
    off = AdapterOffReference(peft_model).logps(batch)
    explicit = ModelReference(base_copy).logps(batch)
    torch.testing.assert_close(off[0], explicit[0])
    torch.testing.assert_close(off[1], explicit[1])
    with torch.no_grad():  # and the adapters really change the policy
        on = peft_model(input_ids=batch.input_ids).logits
        ref = base_copy(input_ids=batch.input_ids).logits
    assert not torch.allclose(on, ref)


def _losses(result):
    return [h["loss"] for h in result.history]


def test_lora_training_with_adapter_reference_matches_an_explicit_copy_of_the_base(tmp_path, tokenizer):
    settings = ("model.lora=true", "model.lora_r=4", "train.batch_size=4", "train.max_steps=3")
    adapter = train(
        quiet_config(str(tmp_path / "a"), *settings),
        model=tiny_llama(len(tokenizer), seed=5),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    explicit = train(
        quiet_config(str(tmp_path / "b"), *settings, "reference.strategy=copy"),
        model=tiny_llama(len(tokenizer), seed=5),
        tokenizer=tokenizer,
        train_data=RECORDS,
        reference_model=tiny_llama(len(tokenizer), seed=5),
    )
    assert _losses(adapter) == pytest.approx(_losses(explicit), abs=1e-6)
    assert adapter.history[-1]["rewards/margins"] != 0.0


def test_precomputed_reference_gives_the_same_losses_as_a_live_copy(tmp_path, tokenizer):
    settings = ("train.batch_size=4", "train.max_steps=4")
    live = train(
        quiet_config(str(tmp_path / "live"), *settings, "reference.strategy=copy"),
        model=tiny_llama(len(tokenizer), seed=6),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    cached = train(
        quiet_config(str(tmp_path / "pre"), *settings, "reference.strategy=precomputed"),
        model=tiny_llama(len(tokenizer), seed=6),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    assert _losses(cached) == pytest.approx(_losses(live), abs=1e-6)
    assert (tmp_path / "pre" / "reference_logps.pt").is_file()


def test_precomputed_cache_is_reused_by_the_next_run(tmp_path, tokenizer, monkeypatch):
    settings = ("train.batch_size=4", "train.max_steps=1", "reference.strategy=precomputed")
    train(
        quiet_config(str(tmp_path / "run"), *settings),
        model=tiny_llama(len(tokenizer), seed=6),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )

    def no_second_pass(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed although the cache matches")

    monkeypatch.setattr(reference_module, "precompute", no_second_pass)
    train(
        quiet_config(str(tmp_path / "run"), *settings, "train.overwrite=true"),
        model=tiny_llama(len(tokenizer), seed=6),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )


@pytest.mark.parametrize("change", ["model", "data", "max_length"])
def test_precomputed_cache_is_refused_when_the_fingerprint_differs(tmp_path, tokenizer, change):
    settings = ["train.batch_size=4", "train.max_steps=1", "reference.strategy=precomputed"]
    train(
        quiet_config(str(tmp_path / "run"), *settings),
        model=tiny_llama(len(tokenizer), seed=6),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    seed, records = 6, RECORDS
    if change == "model":
        seed = 9
    elif change == "data":
        records = sentiment_records(12, seed=2)
    else:
        settings.append("data.max_length=20")
    with pytest.raises(
        ReferenceCacheError, match=r"reference_logps\.pt.*another model, data or tokenization"
    ):
        train(
            quiet_config(str(tmp_path / "run"), *settings, "train.resume=true"),
            model=tiny_llama(len(tokenizer), seed=seed),
            tokenizer=tokenizer,
            train_data=records,
        )


def test_reference_free_objectives_get_no_reference(tmp_path):
    cfg = quiet_config(str(tmp_path), "objective.loss=simpo")
    assert choose_strategy(cfg, needs_reference=False, policy_is_peft=False) == "none"


def test_auto_strategy_is_adapter_with_lora_and_copy_without(tmp_path):
    cfg = quiet_config(str(tmp_path))
    assert choose_strategy(cfg, needs_reference=True, policy_is_peft=True) == "adapter"
    assert choose_strategy(cfg, needs_reference=True, policy_is_peft=False) == "copy"


def test_simpo_training_never_runs_a_reference_forward(tmp_path, tokenizer, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("reference forward in a reference-free run")

    monkeypatch.setattr(ModelReference, "logps", forbidden)
    monkeypatch.setattr(AdapterOffReference, "logps", forbidden)
    result = train(
        quiet_config(str(tmp_path), "objective.loss=simpo", "train.max_steps=2", "train.batch_size=4"),
        model=tiny_llama(len(tokenizer)),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    assert result.steps == 2


def test_precomputed_eval_pairs_do_not_share_cache_slots_with_training_pairs(tmp_path, tokenizer):
    # A dropped training record makes dataset indices run past the number of kept pairs.
    records = [*RECORDS[:5], {"prompt": "Q:", "chosen": " same", "rejected": " same"}, *RECORDS[5:]]
    settings = ("train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "data.identical_pairs=drop")
    runs = {}
    for strategy in ("copy", "precomputed"):
        result = train(
            quiet_config(str(tmp_path / strategy), *settings, f"reference.strategy={strategy}"),
            model=tiny_llama(len(tokenizer), seed=6),
            tokenizer=tokenizer,
            train_data=records,
            eval_data=sentiment_records(4, seed=8),
        )
        runs[strategy] = [h for h in result.history if "eval_loss" in h][-1]
    for name in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected"):
        assert runs["precomputed"][name] == pytest.approx(runs["copy"][name], abs=1e-6), name


def test_reference_path_loads_another_checkpoint_as_the_reference(tmp_path, tokenizer):
    other = tiny_llama(len(tokenizer), seed=12)
    other.save_pretrained(tmp_path / "other")
    settings = ("train.batch_size=4", "train.max_steps=2")
    by_path = train(
        quiet_config(str(tmp_path / "a"), *settings, f"reference.path={tmp_path / 'other'}"),
        model=tiny_llama(len(tokenizer), seed=5),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    by_object = train(
        quiet_config(str(tmp_path / "b"), *settings),
        model=tiny_llama(len(tokenizer), seed=5),
        tokenizer=tokenizer,
        train_data=RECORDS,
        reference_model=tiny_llama(len(tokenizer), seed=12),
    )
    assert _losses(by_path) == pytest.approx(_losses(by_object), abs=1e-6)
    # A reference other than the starting policy: the first step already has a margin.
    assert by_path.history[0]["rewards/margins"] != 0.0


def test_overwriting_a_run_replaces_its_stale_precomputed_cache(tmp_path, tokenizer):
    settings = ("train.batch_size=4", "train.max_steps=1", "reference.strategy=precomputed")
    for seed in (6, 9):  # the second run starts from other weights: the old cache is stale
        train(
            quiet_config(str(tmp_path / "run"), *settings, "train.overwrite=true"),
            model=tiny_llama(len(tokenizer), seed=seed),
            tokenizer=tokenizer,
            train_data=RECORDS,
        )
    assert (tmp_path / "run" / "final").is_dir()


# --------------------------------------------------------------------------- LD-DPO's tails


def test_every_strategy_gives_the_same_tail_sums(tokenizer):
    """A live model and the precomputed tables give the sums over ``label_tail`` alike."""
    model = tiny_llama(len(tokenizer), seed=5)
    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    batch = collate_pairs(pairs[2:5], tokenizer.pad_token_id)
    live = ModelReference(model)
    tables = reference_module.precompute(
        live, pairs[:6], reference_module.Batching(tokenizer.pad_token_id, 3)
    )
    sums, tails = live.logps_and_tails(batch)
    cached_sums, cached_tails = reference_module.PrecomputedReference(tables).logps_and_tails(batch)
    torch.testing.assert_close(cached_sums, sums)
    torch.testing.assert_close(cached_tails, tails)
    torch.testing.assert_close(live.logps(batch), sums)
    assert (tails != 0).any() and (tails != sums).any()


def test_ld_dpo_and_wpo_train_alike_with_a_live_and_a_precomputed_reference(tmp_path, tokenizer):
    settings = ("objective.ld_alpha=0.3", "objective.wpo=true", "train.batch_size=4", "train.max_steps=2")
    runs = {
        strategy: train(
            quiet_config(str(tmp_path / strategy), *settings, f"reference.strategy={strategy}"),
            model=tiny_llama(len(tokenizer), seed=6),
            tokenizer=tokenizer,
            train_data=RECORDS,
        )
        for strategy in ("copy", "precomputed")
    }
    assert _losses(runs["precomputed"]) == pytest.approx(_losses(runs["copy"]), abs=1e-6)
    # Step 1: policy = reference, so each pair's DPO loss is log 2; WPO's weights are below 1.
    assert 0 < _losses(runs["copy"])[0] < math.log(2) - 1e-3


def test_a_cache_without_tails_is_refused_for_ld_dpo(tmp_path, tokenizer):
    settings = ["train.batch_size=4", "train.max_steps=1", "reference.strategy=precomputed"]
    train(
        quiet_config(str(tmp_path / "run"), *settings),
        model=tiny_llama(len(tokenizer), seed=6),
        tokenizer=tokenizer,
        train_data=RECORDS,
    )
    cache = tmp_path / "run" / "reference_logps.pt"
    tables = torch.load(cache, weights_only=True)
    torch.save({k: v for k, v in tables.items() if "tail" not in k}, cache)  # as an earlier version wrote
    with pytest.raises(ReferenceCacheError, match="no sums over LD-DPO's tails"):
        train(
            quiet_config(str(tmp_path / "run"), *settings, "objective.ld_alpha=0.5", "train.resume=true"),
            model=tiny_llama(len(tokenizer), seed=6),
            tokenizer=tokenizer,
            train_data=RECORDS,
        )


# --------------------------------------------------------------------------- sharded runs


def _build(tmp_path, tokenizer, strategy, shard, policy=None):
    pairs, _ = prepare_pairs(RECORDS, tokenizer, DataConfig(), progress=False)
    return reference_module.build_reference(
        quiet_config(str(tmp_path), f"reference.strategy={strategy}"),
        True,
        policy if policy is not None else tiny_llama(len(tokenizer), seed=5),
        None,
        pairs,
        tokenizer.pad_token_id,
        reference_module.Placement(shard=shard),
    )


def test_a_live_reference_is_scored_through_the_module_its_shard_function_returns(tmp_path, tokenizer):
    """Under FSDP2 / ZeRO-3 that module is the sharded root; its forward gives the log-probs."""
    given, calls = [], []

    def shard(module):
        given.append(module)

        def counted(*args, **kwargs):
            calls.append(kwargs)
            return module(*args, **kwargs)

        return counted

    reference, strategy = _build(tmp_path, tokenizer, "copy", shard)
    batch = _batch(tokenizer)
    expected = ModelReference(tiny_llama(len(tokenizer), seed=5))
    torch.testing.assert_close(reference.logps(batch), expected.logps(batch))
    torch.testing.assert_close(reference.logps_and_tails(batch), expected.logps_and_tails(batch))
    assert strategy == "copy" and len(given) == 1 and len(calls) == 2
    assert not any(p.requires_grad for p in given[0].parameters())


def test_the_precompute_reads_the_whole_model_and_never_shards_it(tmp_path, tokenizer):
    reference, _ = _build(tmp_path, tokenizer, "precomputed", lambda module: pytest.fail("sharded"))
    assert isinstance(reference, reference_module.PrecomputedReference)


def test_a_lora_reference_is_refused_when_the_reference_would_be_sharded(tmp_path, tokenizer):
    policy = get_peft_model(tiny_llama(len(tokenizer), seed=5), LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ConfigError, match="cannot be sharded"):
        _build(tmp_path, tokenizer, "copy", lambda module: module, policy=policy)
