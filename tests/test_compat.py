"""TRL's and LLaMA-Factory's names: every field of TRL's configs, read from the installed TRL, is
classified in the table (a field a TRL upgrade adds fails here by name), each maps, converts, is
ignored or is refused as its row says, and TRL's own parser and preftune read the same files and
flags to the same values."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import trl
from test_flags import keys_of, other_value, parsed, typed
from trl import DPOConfig, KTOConfig, ModelConfig, RewardConfig, ScriptArguments, SFTConfig, TrlParser

from preftune.cli import main
from preftune.cli.flags import TRUE_BY_DEFAULT
from preftune.config import COMMANDS, ConfigError, RunConfig, load_config
from preftune.config.coerce import describe
from preftune.config.compat import LLAMAFACTORY, TRL
from preftune.config.translate import mapping_markdown

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig
    from trl.scripts.utils import DatasetConfig

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
TRL_CLASSES = [DPOConfig, RewardConfig, SFTConfig, KTOConfig, CPOConfig, ORPOConfig, ModelConfig, ScriptArguments,
               trl.DatasetMixtureConfig]  # fmt: skip
KEYS = {key: kind for key, kind, _, _ in describe(RunConfig)}
HINTS = {key: (hint, default) for command in COMMANDS for key, hint, default in keys_of(command)}


def read(names: dict, command: str | None = None) -> tuple[RunConfig, list[str]]:
    notices: list[str] = []
    config = load_config(None, list(names.items()), command=command, notices=notices)
    return config, notices


# --------------------------------------------------------------------------- the table against TRL


@pytest.mark.parametrize("cls", TRL_CLASSES, ids=lambda c: c.__name__)
def test_every_field_of_trls_configs_is_classified(cls):
    unclassified = [f.name for f in dataclasses.fields(cls) if f.name not in TRL]
    assert not unclassified, f"{cls.__name__} fields missing from preftune.config.compat: {unclassified}"


def test_every_field_of_a_mixtures_dataset_entry_is_read():
    from preftune.config.compat import _ENTRY

    assert {f.name for f in dataclasses.fields(DatasetConfig)} == _ENTRY


def test_every_preftune_key_the_tables_name_exists():
    pattern = re.compile(
        r"\b(model|data|objective|reference|train|rm|prompts|reward|rollout|online|ppo)\.(\w+)"
    )
    for name, rule in {**TRL, **LLAMAFACTORY}.items():
        for section, key in pattern.findall(f"{rule.key} {rule.note} {rule.say}"):
            assert f"{section}.{key}" in KEYS, f"{name}: {section}.{key}"


def test_the_no_flags_are_trls_true_by_default_booleans():
    true = {f.name for cls in TRL_CLASSES for f in dataclasses.fields(cls) if f.default is True}
    assert true == set(TRUE_BY_DEFAULT)


MAPPED = sorted(name for name, rule in TRL.items() if rule.kind == "mapped")


@pytest.mark.parametrize("name", MAPPED)
def test_a_mapped_trl_name_sets_its_preftune_key_to_the_same_value(name):
    key = TRL[name].key
    value = other_value(*HINTS[key])
    assert typed([(name, value)]) == typed([f"{key}={value}"]) != RunConfig()


def test_every_dpoconfig_field_with_a_preftune_equivalent_maps_or_converts():
    kinds = {f.name: TRL[f.name].kind for f in dataclasses.fields(DPOConfig)}
    assert sum(kind in ("mapped", "converted") for kind in kinds.values()) >= 40
    for name in ("beta", "loss_type", "learning_rate", "per_device_train_batch_size", "max_length",
                 "precompute_ref_log_probs", "gradient_accumulation_steps", "ld_alpha", "use_weighting"):  # fmt: skip
        assert kinds[name] in ("mapped", "converted"), name


CONVERSIONS = [
    ({"max_steps": -1}, {"train.max_steps": None}),
    ({"max_steps": 40}, {"train.max_steps": 40}),
    ({"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 5}, {"train.scheduler": "constant", "train.warmup_steps": 5}),
    ({"warmup_steps": 0.1}, {"train.warmup_ratio": 0.1}),
    ({"optim": "adamw_torch_fused"}, {"train.optimizer": "adamw"}),
    ({"optim": "adamw_bnb_8bit"}, {"train.optimizer": "adamw_8bit"}),
    ({"optim": "paged_adamw_8bit"}, {"train.optimizer": "paged_adamw_8bit"}),
    ({"dataset_num_proc": 4}, {"data.num_proc": 4}),
    ({"resume_from_checkpoint": "runs/dpo/checkpoint-40"}, {"train.resume": "runs/dpo/checkpoint-40"}),
    ({"max_grad_norm": 0}, {"train.max_grad_norm": None}),
    ({"train_sampling_strategy": "sequential"}, {"train.shuffle": False}),
    ({"bf16": True}, {"train.mixed_precision": "bf16"}),
    ({"bf16": False, "fp16": False}, {"train.mixed_precision": "no"}),
    ({"fp16": True}, {"train.mixed_precision": "fp16"}),
    ({"activation_checkpointing": True}, {"model.gradient_checkpointing": True}),
    ({"logging_strategy": "steps", "logging_steps": 25}, {"train.log_every": 25}),
    ({"disable_tqdm": True}, {"train.progress": False}),
    ({"report_to": "wandb,tensorboard"}, {"train.report_to": ["wandb", "tensorboard"]}),
    ({"report_to": "none"}, {"train.report_to": ["none"]}),
    ({"eval_strategy": "steps", "eval_steps": 50, "dataset_name": "org/set", "dataset_test_split": "val"},
     {"train.eval_every": 50, "data.eval_path": "org/set", "data.eval_split": "val", "data.path": "org/set"}),
    ({"evaluation_strategy": "steps", "logging_steps": 20}, {"train.eval_every": 20, "train.log_every": 20}),
    ({"save_strategy": "no"}, {"train.save_every": None}),
    ({"save_steps": 100.0}, {"train.save_every": 100}),
    ({"resume_from_checkpoint": True}, {"train.resume": True}),
    ({"lora_target_modules": ["q_proj", "v_proj"]}, {"model.lora_target_modules": ["q_proj", "v_proj"]}),
    ({"use_rslora": True, "lora_r": 16, "lora_alpha": 8}, {"model.lora_alpha": 32, "model.lora_r": 16}),
    ({"dataset_name": "org/set", "dataset_config": "cfg"}, {"data.path": "org/set:cfg"}),
    ({"dataset_name": "org/set", "dataset_train_split": "train[:10%]"}, {"data.path": "org/set", "data.split": "train[:10%]"}),
    ({"dataset_streaming": True, "dataset_train_split": "train"}, {"data.split": "stream:train"}),
    ({"datasets": [{"path": "org/set", "name": "cfg", "split": "train"}]}, {"data.path": "org/set:cfg", "data.split": "train"}),
    ({"datasets": [{"path": "json", "data_files": "pairs.jsonl"}], "streaming": True},
     {"data.path": "pairs.jsonl", "data.split": "stream:train"}),
    ({"model_init_kwargs": {"dtype": "bfloat16", "revision": "v1", "device_map": "auto"}},
     {"model.dtype": "bfloat16", "model.revision": "v1"}),
    ({"padding_free": True}, {"data.layout": "packed"}),
    ({"precompute_ref_log_probs": True, "precompute_ref_batch_size": 4},
     {"reference.strategy": "precomputed", "reference.batch_size": 4}),
    ({"loss_type": "sigmoid"}, {"objective.loss": ["sigmoid"]}),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, {"objective.loss": ["sigmoid", "sft"], "objective.weights": [1.0, 0.5]}),
    ({"loss_type": "aot_pair"}, {"objective.loss": ["aot_unpaired"]}),
    ({"rpo_alpha": 0.5}, {"objective.loss": ["sigmoid", "sft"], "objective.weights": [1.0, 0.5]}),
    ({"reference_free": True, "loss_type": "hinge"}, {"objective.loss": ["cpo_hinge"], "objective.cpo_alpha": 0.0}),
    ({"loss_type": "simpo", "cpo_alpha": 0.5}, {"objective.loss": ["cpo_simpo"], "objective.beta": 0.1, "objective.cpo_alpha": 0.5}),
    ({"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0}, {"objective.loss": ["simpo"], "objective.beta": 2.0, "objective.cpo_alpha": 0.0}),
    ({"loss_type": "sigmoid", "simpo_gamma": 0.7}, {"objective.loss": ["cpo"], "objective.beta": 0.1, "objective.simpo_gamma": 0.7}),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
     {"objective.f_divergence": "alpha_divergence", "objective.f_divergence_alpha": 0.3}),
    ({"chat_template_path": "t.jinja"}, {"data.chat_template": "t.jinja"}),
    ({"completion_only_loss": False}, {"data.completion_only_loss": False}),
    ({"assistant_only_loss": True}, {"data.completion_only_loss": True}),
    ({"force_use_ref_model": True}, {"reference.strategy": "copy"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("names", "expected"), CONVERSIONS, ids=lambda v: ",".join(v) if isinstance(v, dict) else ""
)
def test_a_converted_trl_name_sets_what_its_row_says(names, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    (tmp_path / "pairs.jsonl").write_text("")
    notices: list[str] = []
    from preftune.config.load import config_tree

    tree = config_tree(None, list(names.items()), None, None, notices)
    found = {f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()}
    assert {key: typed([(key, value)]) for key, value in found.items()} == {
        key: typed([(key, value)]) for key, value in expected.items()
    }


def test_every_converted_trl_name_has_an_example_here():
    shown = {name for names, _ in CONVERSIONS for name in names}
    quiet = {"eval_steps", "dataset_test_split", "lr_scheduler_kwargs"}  # read only with another name
    missing = [n for n, r in TRL.items() if r.kind == "converted" and n not in shown and n not in quiet]
    assert not missing


REFUSED = sorted((source, name) for source, table in (("trl", TRL), ("llamafactory", LLAMAFACTORY))
                 for name, rule in table.items() if rule.kind == "refused")  # fmt: skip


@pytest.mark.parametrize(("source", "name"), REFUSED)
def test_a_refused_name_ends_in_one_line_naming_it_and_what_comes_closest(source, name, tmp_path):
    path = tmp_path / "run.yaml"
    marker = "stage: dpo\n" if source == "llamafactory" and name != "stage" else ""
    path.write_text(f"{marker}{name}: something_else\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, notices=[])
    message = str(refused.value)
    assert (
        message.startswith(f"{source}: {name}=something_else has no preftune equivalent")
        and "\n" not in message
    )
    if TABLES_KEY[(source, name)]:
        assert f"closest: {TABLES_KEY[(source, name)]}" in message


TABLES_KEY = {(s, n): (TRL if s == "trl" else LLAMAFACTORY)[n].key for s, n in REFUSED}


@pytest.mark.parametrize(
    "name", ["push_to_hub", "deepspeed", "disable_dropout", "truncation_mode", "eval_delay"]
)
def test_a_refused_name_at_a_value_without_effect_is_accepted(name):
    value = {"push_to_hub": False, "deepspeed": None, "disable_dropout": True, "truncation_mode": "keep_start",
             "eval_delay": 0}[name]  # fmt: skip
    assert read({name: value})[0] == RunConfig()


IGNORED = sorted(name for name, rule in TRL.items() if rule.kind == "ignored")


@pytest.mark.parametrize("name", IGNORED)
def test_an_ignored_name_changes_nothing_and_says_so(name):
    config, notices = read({name: "something_else"})
    assert config == RunConfig()
    assert notices == [
        f"trl: {name}={'***' if TRL[name].secret else 'something_else'} ignored: {TRL[name].note}"
    ]


def test_a_secret_is_never_shown():
    _, notices = read({"hub_token": "hf_abcdef"})
    assert "hf_abcdef" not in " ".join(notices)


def test_a_mapped_name_says_which_preftune_key_it_became():
    assert read({"per_device_train_batch_size": 4})[1] == [
        "trl: per_device_train_batch_size=4 -> train.batch_size"
    ]


def test_a_trl_name_the_command_does_not_read_is_refused_like_a_preftune_key():
    with pytest.raises(ConfigError) as refused:
        read({"beta": 0.2}, command="sft")
    assert str(refused.value) == (
        "beta (TRL's name for objective.beta) is read by 'preftune train', 'preftune online', "
        "'preftune check-data', not by 'preftune sft'"
    )


def test_an_unknown_flat_name_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rat: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"^unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)$"):
        load_config(path)


# --------------------------------------------------------------------------- TRL's files and flags, read by both


def trl_reads(classes: tuple, argv: list[str]) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrlParser(classes).parse_args_and_config(
            args=[*argv, "--use_cpu", "--output_dir", "trainer_output"]
        )


def agree(trl_args: object, model: object, config: RunConfig) -> None:
    """The values TRL parsed are the values preftune will train with."""
    pairs = [
        (trl_args.learning_rate, config.train.learning_rate),
        (trl_args.num_train_epochs, config.train.epochs),
        (str(trl_args.lr_scheduler_type.value), config.train.scheduler),
        (trl_args.gradient_checkpointing, config.model.gradient_checkpointing),
        (trl_args.per_device_train_batch_size, config.train.batch_size),
        (trl_args.max_length, config.data.max_length),
        (model.model_name_or_path, config.model.name_or_path),
        (model.use_peft, config.model.lora),
    ]
    for theirs, ours in pairs:
        assert theirs == ours


def test_trls_example_config_reads_as_trls_parser_reads_it():
    path = str(CONFIGS / "trl" / "example_config.yaml")
    script, args, model = trl_reads((ScriptArguments, SFTConfig, ModelConfig), ["--config", path])
    config = load_config(path, command="sft", notices=[])
    agree(args, model, config)
    assert (config.data.path, config.train.report_to) == (script.dataset_name, ["none"])


def test_trl_flags_over_a_trl_file_read_as_trls_parser_reads_them():
    flags = ["--learning_rate", "3e-6", "--no_gradient_checkpointing", "--use_peft", "--lora_target_modules",
             "q_proj", "v_proj", "--per-device-train-batch-size", "4", "--beta", "0.2", "--loss_type", "sigmoid", "sft"]  # fmt: skip
    path = str(CONFIGS / "trl" / "docs" / "dpo_config.yaml")
    script, args, model = trl_reads((ScriptArguments, DPOConfig, ModelConfig), ["--config", path, *flags])
    config = load_config(path, parsed(["train", *flags]), command="train", notices=[])
    agree(args, model, config)
    assert (args.beta, args.loss_type, model.lora_target_modules, model.lora_dropout) == (
        config.objective.beta, config.objective.loss, config.model.lora_target_modules, config.model.lora_dropout,
    )  # fmt: skip
    assert script.dataset_name == config.data.path


def test_trls_resume_from_checkpoint_path_is_resume_path():
    by_trl = typed(parsed(["train", "--resume_from_checkpoint", "runs/dpo/checkpoint-40"]))
    assert by_trl == typed(parsed(["train", "--resume", "runs/dpo/checkpoint-40"]))
    assert by_trl.train.resume == "runs/dpo/checkpoint-40"
    assert typed(parsed(["train", "--resume"])).train.resume is True


def test_a_trl_flag_equals_the_same_set():
    assert typed(parsed(["train", "--learning_rate", "1e-6"])) == typed(["train.learning_rate=1e-6"])


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("num_processes", "num_processes=4 has no preftune equivalent: TRL's launcher; closest: accelerate launch --num_processes N"),
        ("accelerate_config", "accelerate_config=zero2 has no preftune equivalent: TRL's launcher; closest: accelerate launch --config_file"),
        ("datasets_mixture", "datasets: a mixture of 2 datasets has no preftune equivalent; closest: concatenate them"),
    ],
)  # fmt: skip
def test_trls_launcher_and_mixture_examples_are_refused_naming_what_to_do(folder, message):
    with pytest.raises(ConfigError) as refused:
        load_config(CONFIGS / "trl" / "docs" / folder / "dpo_config.yaml", command="train", notices=[])
    assert message in str(refused.value)


# --------------------------------------------------------------------------- LLaMA-Factory


@pytest.fixture
def lf_dir(tmp_path, monkeypatch):
    """LLaMA-Factory's layout: data/dataset_info.json beside the run's working folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(
        '{"dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": true, "formatting": "sharegpt"}}'
    )
    (tmp_path / "data" / "dpo_en_demo.json").write_text("[]")
    return tmp_path


def test_llamafactorys_dpo_example_reads_as_llamafactory_runs_it(lf_dir):
    config = load_config(CONFIGS / "llamafactory" / "llama3_lora_dpo.yaml", command="train", notices=[])
    model, train = config.model, config.train
    assert (model.lora, model.lora_r, model.lora_alpha, model.lora_target_modules) == (
        True,
        8,
        16,
        "all-linear",
    )
    assert (config.objective.loss, config.objective.beta, config.data.max_length) == (["sigmoid"], 0.1, 2048)
    assert (train.batch_size, train.grad_accum, train.learning_rate, train.scheduler) == (
        1,
        8,
        5e-6,
        "cosine",
    )
    assert (train.warmup_ratio, train.mixed_precision, model.gradient_checkpointing) == (0.1, "bf16", True)
    assert config.data.path == "data/dpo_en_demo.json"


def test_a_llamafactory_stage_run_by_another_command_is_refused(lf_dir):
    with pytest.raises(
        ConfigError, match=r"stage=rm is trained by 'preftune rm train', not by 'preftune train'"
    ):
        load_config(CONFIGS / "llamafactory" / "llama3_lora_reward.yaml", command="train", notices=[])


def test_llamafactorys_pref_ftx_adds_the_sft_term_with_its_weight(lf_dir):
    config, _ = read({"stage": "dpo", "pref_loss": "simpo", "pref_ftx": 0.3}, command="train")
    assert (config.objective.loss, config.objective.weights) == (["simpo", "sft"], [1.0, 0.3])


def test_llamafactorys_quantized_reference_and_workers_are_preftunes(lf_dir):
    names = {"stage": "dpo", "finetuning_type": "full", "ref_model": "org/ref", "ref_model_quantization_bit": 8,
             "preprocessing_num_workers": 4}  # fmt: skip
    config, _ = read(names, command="train")
    assert (config.reference.path, config.reference.quantize, config.data.num_proc) == ("org/ref", "int8", 4)


def test_an_optimizer_preftune_lacks_is_refused_naming_the_closest(lf_dir):
    with pytest.raises(
        ConfigError, match=r"optim=paged_adamw_32bit .* closest: train.optimizer=paged_adamw_8bit"
    ):
        read({"optim": "paged_adamw_32bit"})


def test_llamafactorys_max_length_is_its_generation_length_not_the_training_one(lf_dir):
    (lf_dir / "run.yaml").write_text("stage: dpo\ncutoff_len: 512\nmax_length: 64\n")
    notices: list[str] = []
    config = load_config(lf_dir / "run.yaml", command="train", notices=notices)
    assert config.data.max_length == 512
    assert any("max_length=64 ignored" in line for line in notices)


# --------------------------------------------------------------------------- preftune config --from-trl


def test_config_from_trl_prints_a_preftune_yaml_that_runs_the_same(tmp_path, capsys):
    source = CONFIGS / "trl" / "example_config.yaml"
    assert main(["config", "--from-trl", str(source), "--command", "sft"]) == 0
    printed = tmp_path / "run.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed, command="sft") == load_config(source, command="sft", notices=[])


def test_config_from_llamafactory_takes_the_command_from_the_stage(lf_dir, capsys):
    assert (
        main(["config", "--from-llamafactory", str(CONFIGS / "llamafactory" / "llama3_lora_dpo.yaml")]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("# preftune train --config THIS.yaml")
    assert "lora_alpha: 16" in out


def test_config_from_trl_refuses_a_llamafactory_file(lf_dir, capsys):
    assert main(["config", "--from-trl", str(CONFIGS / "llamafactory" / "llama3_lora_dpo.yaml")]) == 2
    assert "a LLaMA-Factory config (use --from-llamafactory)" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["trl", "llamafactory"])
def test_the_docs_page_holds_the_table_generated_from_the_mapping(source):
    page = (Path(__file__).parents[1] / "docs" / "from-trl.md").read_text()
    assert mapping_markdown(source) in page


def test_the_docs_page_counts_trls_fields_as_the_table_classifies_them():
    page = " ".join((Path(__file__).parents[1] / "docs" / "from-trl.md").read_text().split())

    def counts(names: set[str]) -> str:
        kinds = [TRL[name].kind for name in names]
        return ", ".join(f"{kinds.count(k)} {k}" for k in ("mapped", "converted", "ignored", "refused"))

    every = {f.name for cls in TRL_CLASSES for f in dataclasses.fields(cls)}
    dpo = {f.name for f in dataclasses.fields(DPOConfig)}
    assert f"{len(every)} distinct field names: {counts(every)}." in page
    assert f"DPOConfig's {len(dpo)} fields: {counts(dpo)}." in page
