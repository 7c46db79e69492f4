"""Specification of preftune.config: defaults, YAML sections, ``--set`` overrides, validation.

Every bad value is refused with a :class:`ConfigError` whose message names the full key,
before any model loads.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from preftune.config import ConfigError, load_config
from preftune.experiments.synthetic import CHAT_TEMPLATE
from preftune.losses import build_objective


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(*overrides: str, path: Path | None = None) -> str:
    """The message of the ConfigError that loading and checking a config must raise (what every
    recipe does first: ``load_config``, then the objective registry's rules)."""
    with pytest.raises(ConfigError) as info:
        build_objective(load_config(path, overrides=list(overrides)).objective)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_default_objective_is_sigmoid_dpo_with_the_objectives_own_beta():
    config = load_config()
    assert config.objective.loss == ["sigmoid"]
    assert config.objective.beta is None
    assert config.objective.weights is None
    assert config.objective.label_smoothing == 0.0


def test_default_training_hyperparameters():
    train = load_config().train
    assert train.learning_rate == 1e-6
    assert isinstance(train.learning_rate, float)
    assert train.batch_size == 8
    assert train.grad_accum == 1
    assert train.max_steps is None
    assert train.scheduler == "linear"
    assert train.max_grad_norm == 1.0
    assert train.resume is False


def test_default_model_data_and_reference_settings():
    config = load_config()
    assert config.model.lora is False
    assert config.model.dtype == "auto"
    assert config.data.max_length == 1024
    assert config.data.max_prompt_length is None
    assert config.reference.strategy == "auto"


# --------------------------------------------------------------------------- YAML and overrides


def test_yaml_sections_load_into_the_typed_config(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model:
          name_or_path: my/model
          lora: true
        data:
          path: pairs.jsonl
          max_length: 256
        objective:
          loss: [ipo]
          beta: 0.5
        reference:
          strategy: adapter
        train:
          learning_rate: 5e-7
          batch_size: 2
          scheduler: cosine
        """,
    )
    config = load_config(path)
    assert config.model.name_or_path == "my/model"
    assert config.model.lora is True
    assert config.data.path == "pairs.jsonl"
    assert config.data.max_length == 256
    assert config.objective.loss == ["ipo"]
    assert config.objective.beta == 0.5
    assert config.reference.strategy == "adapter"
    assert config.train.batch_size == 2
    assert config.train.scheduler == "cosine"


def test_yaml_exponent_without_a_dot_is_read_as_a_float(tmp_path):
    # PyYAML reads ``5e-7`` as the string "5e-7" (YAML 1.1); the config must still give a float.
    config = load_config(write_yaml(tmp_path, "train:\n  learning_rate: 5e-7\n"))
    assert config.train.learning_rate == 5e-7
    assert isinstance(config.train.learning_rate, float)


def test_empty_config_file_gives_the_defaults(tmp_path):
    config = load_config(write_yaml(tmp_path, ""))
    assert config == load_config()


def test_set_overrides_are_typed_by_the_field_annotation():
    config = load_config(
        overrides=[
            "train.learning_rate=5e-7",
            "objective.loss=dpo,sft",
            "train.max_steps=3",
            "data.max_length=null",
            "model.lora=true",
        ]
    )
    assert config.train.learning_rate == 5e-7
    assert isinstance(config.train.learning_rate, float)
    assert config.objective.loss == ["dpo", "sft"]
    assert config.train.max_steps == 3
    assert isinstance(config.train.max_steps, int)
    assert config.data.max_length is None
    assert config.model.lora is True


def test_set_overrides_take_precedence_over_the_yaml_file(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        train:
          learning_rate: 1.0e-5
          max_steps: 100
          batch_size: 4
        objective:
          loss: [ipo]
        model:
          lora: false
        """,
    )
    config = load_config(
        path,
        overrides=[
            "train.learning_rate=5e-7",
            "train.max_steps=3",
            "objective.loss=dpo,sft",
            "model.lora=true",
        ],
    )
    assert config.train.learning_rate == 5e-7
    assert config.train.max_steps == 3
    assert config.objective.loss == ["dpo", "sft"]
    assert config.model.lora is True
    assert config.train.batch_size == 4  # not overridden: the file's value stays


def test_set_accepts_a_yaml_list_value():
    assert load_config(overrides=["objective.loss=[dpo, sft]"]).objective.loss == ["dpo", "sft"]


def test_base_values_override_the_file_and_set_overrides_the_base(tmp_path):
    # The CLI passes --model / --data / --loss as ``base``: they beat the file, --set beats them.
    path = write_yaml(tmp_path, "model:\n  name_or_path: from/file\ndata:\n  path: file.jsonl\n")
    config = load_config(
        path,
        overrides=["data.path=set.jsonl"],
        base={"model.name_or_path": "from/flag", "data.path": "flag.jsonl"},
    )
    assert config.model.name_or_path == "from/flag"
    assert config.data.path == "set.jsonl"


# --------------------------------------------------------------------------- unknown keys


def test_unknown_override_key_names_the_full_key_and_suggests_the_closest():
    message = config_error("train.learning_rat=1")
    assert "train.learning_rat" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_section_is_refused_with_a_suggestion():
    message = config_error("trian.batch_size=2")
    assert "unknown key 'trian'" in message
    assert "did you mean 'train'" in message


def test_unknown_section_without_a_close_match_is_refused():
    assert "unknown key 'nonsense'" in config_error("nonsense.value=1")


def test_misspelled_key_in_the_yaml_file_is_refused_with_a_suggestion(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: 2\n  warmup_ration: 0.1\n")
    message = config_error(path=path)
    assert "train.warmup_ration" in message
    assert "did you mean 'warmup_ratio'" in message


def test_override_without_equals_sign_is_refused():
    assert "expected section.key=value" in config_error("train.learning_rate")


def test_value_for_a_whole_section_is_refused():
    assert "train: expected a section" in config_error("train=3")


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("overrides", "key", "detail"),
    [
        (["train.batch_size=abc"], "train.batch_size", "expected an integer"),
        (["train.max_steps=3.5"], "train.max_steps", "expected an integer"),
        (["train.learning_rate=fast"], "train.learning_rate", "expected a number"),
        (["train.epochs=true"], "train.epochs", "expected a number"),
        (["model.lora=maybe"], "model.lora", "expected true or false"),
        (["objective.loss=dpo,sft", "objective.weights=1,abc"], "objective.weights[1]", "expected a number"),
    ],
)
def test_value_of_the_wrong_type_is_refused_naming_the_key(overrides, key, detail):
    message = config_error(*overrides)
    assert message.startswith(f"{key}:")
    assert detail in message


def test_choice_not_among_the_allowed_values_lists_them_and_suggests_the_closest():
    message = config_error("train.scheduler=cosin")
    assert message.startswith("train.scheduler:")
    assert "'linear', 'cosine', 'constant'" in message
    assert "did you mean 'cosine'" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.batch_size=0"], "train.batch_size"),
        (["train.learning_rate=0"], "train.learning_rate"),
        (["train.learning_rate=-1e-6"], "train.learning_rate"),
        (["train.warmup_ratio=1.5"], "train.warmup_ratio"),
        (["train.grad_accum=0"], "train.grad_accum"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.save_every=0"], "train.save_every"),
        (["data.max_length=1"], "data.max_length"),
        (["data.max_length=128", "data.max_prompt_length=128"], "data.max_prompt_length"),
        (["data.max_length=128", "data.max_prompt_length=200"], "data.max_prompt_length"),
        (["model.lora_dropout=1.0"], "model.lora_dropout"),
        (["objective.label_smoothing=0.6"], "objective.label_smoothing"),
        (["objective.beta=-1"], "objective.beta"),
        (["objective.beta=0"], "objective.beta"),
        (["objective.loss=dpo,sft", "objective.weights=1.0"], "objective.weights"),
        (["objective.loss=simpo", "objective.alphapo_alpha=inf"], "objective.alphapo_alpha"),
    ],
)
def test_value_out_of_range_is_refused_naming_the_key(overrides, key):
    assert config_error(*overrides).startswith(f"{key}:")


def test_prompt_budget_below_max_length_is_accepted():
    config = load_config(overrides=["data.max_length=128", "data.max_prompt_length=127"])
    assert config.data.max_prompt_length == 127


def test_unknown_objective_name_suggests_the_closest_registered_one():
    message = config_error("objective.loss=sigmod")
    assert message.startswith("objective.loss:")
    assert "unknown objective 'sigmod'" in message
    assert "did you mean 'sigmoid'" in message


def test_adapter_reference_without_lora_is_refused():
    message = config_error("reference.strategy=adapter")
    assert message.startswith("reference.strategy:")
    assert "model.lora=true" in message


def test_adapter_reference_with_lora_is_accepted():
    config = load_config(overrides=["reference.strategy=adapter", "model.lora=true"])
    assert config.reference.strategy == "adapter"


# --------------------------------------------------------------------------- config files


def test_malformed_yaml_file_is_refused_naming_the_file(tmp_path):
    path = write_yaml(tmp_path, "train: {learning_rate: [1, 2}\n", name="broken.yaml")
    message = config_error(path=path)
    assert str(path) in message
    assert "malformed YAML" in message


def test_missing_config_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "absent.yaml"
    message = config_error(path=path)
    assert str(path) in message
    assert "no such config file" in message


def test_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = write_yaml(tmp_path, "- train\n- model\n", name="list.yaml")
    message = config_error(path=path)
    assert str(path) in message
    assert "mapping" in message


# --------------------------------------------------------------------------- chat template


def test_chat_template_given_as_a_file_path_is_applied_to_the_tokenizer(tmp_path):
    from preftune.experiments.synthetic import build_tokenizer
    from preftune.model.load import prepare_tokenizer

    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    config = load_config(overrides=[f"data.chat_template={template}"])
    assert config.data.chat_template == str(template)  # validation never rewrites the config
    tokenizer = prepare_tokenizer(
        build_tokenizer(chat_template=False), config.model, config.data.chat_template
    )
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_chat_template_path_that_does_not_exist_is_refused(tmp_path):
    message = config_error(f"data.chat_template={tmp_path / 'missing.jinja'}")
    assert message.startswith("data.chat_template:") and "no such file" in message


def test_a_config_built_in_python_is_validated_like_one_read_from_yaml(tmp_path, tokenizer):
    from preftune.config import RunConfig, TrainConfig
    from preftune.recipes.dpo import train

    config = RunConfig(train=TrainConfig(output_dir=str(tmp_path / "run"), learning_rate=-1.0))
    with pytest.raises(ConfigError, match=r"^train.learning_rate: must be > 0"):
        train(
            config,
            model=object(),
            tokenizer=tokenizer,
            train_data=[{"prompt": "a", "chosen": "b", "rejected": "c"}],
        )
    assert not (tmp_path / "run").exists()


def test_inline_chat_template_is_kept_as_given(tmp_path):
    path = write_yaml(tmp_path, yaml.safe_dump({"data": {"chat_template": CHAT_TEMPLATE}}))
    assert load_config(path).data.chat_template == CHAT_TEMPLATE


# --------------------------------------------------------------------------- once bugs


def test_long_inline_chat_template_is_kept_as_given(tmp_path):
    template = "{% for message in messages %}" + "{{ message['content'] }}" * 20 + "{% endfor %}"
    assert re.search(r"[^/]{256}", template)  # a path component longer than the OS allows
    path = write_yaml(tmp_path, yaml.safe_dump({"data": {"chat_template": template}}))
    assert load_config(path).data.chat_template == template


def test_set_value_that_is_not_valid_yaml_is_kept_as_a_string():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_config(overrides=[f"data.chat_template={template}"]).data.chat_template == template


def test_config_path_that_is_a_directory_is_refused_naming_it(tmp_path):
    assert str(tmp_path) in config_error(path=tmp_path)


def test_yaml_bare_no_is_read_as_the_word_where_a_choice_expects_it(tmp_path):
    path = write_yaml(tmp_path, "train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"


def test_every_key_of_every_section_has_its_help_line_wherever_the_section_is_defined():
    from preftune.config import RunConfig
    from preftune.config.coerce import describe

    rows = describe(RunConfig)
    assert {key.split(".")[0] for key, *_ in rows} >= {"train", "rollout", "online", "ppo"}
    assert [key for key, _, _, text in rows if not text] == []
