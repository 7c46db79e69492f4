"""Values that pass a type check and then fail, or give wrong results silently, each refused up front.

Every case ends in exit code 2 with one line on stderr naming the key or flag, no traceback, no
output folder, and the input untouched; the magnitude guard refuses to save a blown-up model.
"""

import json

import pytest

from preftune.cli import main
from preftune.experiments.synthetic import build_tokenizer, tiny_llama

GOOD = {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"}
OTHER = {"prompt": "review of the cafe:", "chosen": " kind warm", "rejected": " cold rude"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lines(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def one_error_line(capsys):
    """The lines of stderr but the progress bars of loading a model (a refusal that needs the model
    loaded comes after them)."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]
    assert not any("Traceback" in line for line in err), err
    return err


# (id, extra train arguments, expected text of the one line)
TRAIN_VALUES = [
    ("beta-inf", ["--set", "objective.beta=inf"], "objective.beta: expected a finite number, got inf"),
    ("beta-nan", ["--set", "objective.beta=nan"], "objective.beta: expected a finite number, got nan"),
    (
        "dpop-lambda-inf",
        ["--loss", "dpop", "--set", "objective.dpop_lambda=inf"],
        "objective.dpop_lambda: expected a finite number",
    ),
    ("weight-decay-inf", ["--set", "train.weight_decay=inf"], "train.weight_decay: expected a finite number"),
    (
        "learning-rate-inf",
        ["--set", "train.learning_rate=inf"],
        "train.learning_rate: expected a finite number",
    ),
    ("epochs-inf", ["--set", "train.epochs=inf"], "train.epochs: expected a finite number"),
    ("adam-beta1-over-one", ["--set", "train.adam_beta1=2"], "train.adam_beta1: must be in [0, 1)"),
    ("adam-beta2-negative", ["--set", "train.adam_beta2=-0.5"], "train.adam_beta2: must be in [0, 1)"),
    ("adam-epsilon-negative", ["--set", "train.adam_epsilon=-1"], "train.adam_epsilon: must be > 0"),
    ("seed-negative", ["--set", "train.seed=-1"], "train.seed: must be in [0, 2**32)"),
    (
        "save-total-limit-negative",
        ["--set", "train.save_total_limit=-1"],
        "train.save_total_limit: must be >= 1 (or null: keep every checkpoint)",
    ),
    (
        "reference-strategy-for-a-reference-free-loss",
        ["--loss", "simpo", "--set", "reference.strategy=copy"],
        "reference.strategy: 'copy' but objective 'simpo' is reference-free",
    ),
    (
        "kto-weights-both-zero",
        ["--loss", "kto", "--set", "objective.desirable_weight=0", "--set", "objective.undesirable_weight=0"],
        "objective.desirable_weight: and objective.undesirable_weight are both 0",
    ),
    (
        "eval-every-without-eval-data",
        ["--set", "train.eval_every=1"],
        "train.eval_every: 1, but the run has no eval data to evaluate",
    ),
]


@pytest.mark.parametrize("name, extra, expected", TRAIN_VALUES, ids=[c[0] for c in TRAIN_VALUES])
def test_a_value_that_would_fail_later_is_refused_before_the_run_naming_its_key(
    tmp_path, capsys, model_dir, name, extra, expected
):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, OTHER))
    before = data.read_bytes()
    output = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output)]
    assert main([*argv, "--set", "train.max_steps=1", *extra]) == 2
    err = one_error_line(capsys)
    assert len(err) == 1 and expected in err[0], err
    assert not (output / "final").exists() and not list(output.glob("checkpoint-*"))
    assert data.read_bytes() == before


# (id, argv after the command's required arguments, the flag named)
FLAG_VALUES = [
    (
        "eval-batch-size-negative",
        ["eval", "--batch-size", "-2"],
        "argument --batch-size: must be >= 1, got -2",
    ),
    ("eval-batch-size-zero", ["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ("eval-samples-negative", ["eval", "--samples", "-2"], "argument --samples: must be >= 0, got -2"),
    (
        "eval-max-new-tokens-zero",
        ["eval", "--max-new-tokens", "0"],
        "argument --max-new-tokens: must be >= 1",
    ),
    ("eval-beta-nan", ["eval", "--beta", "nan"], "argument --beta: must be a finite number > 0, got 'nan'"),
    (
        "rm-score-batch-size",
        ["rm", "score", "--batch-size", "-3"],
        "argument --batch-size: must be >= 1, got -3",
    ),
    ("check-data-sample", ["check-data", "d.jsonl", "--sample", "-1"], "argument --sample: must be >= 0"),
]


@pytest.mark.parametrize("name, argv, expected", FLAG_VALUES, ids=[c[0] for c in FLAG_VALUES])
def test_a_negative_or_non_finite_flag_is_refused_by_the_parser_naming_the_flag(
    tmp_path, capsys, name, argv, expected
):
    required = {
        "eval": ["--policy", "p", "--data", "d=d.jsonl", "--output", str(tmp_path / "out")],
        "rm": ["--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "scores.jsonl")],
        "check-data": [],
    }[argv[0]]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *required])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1], err
    assert not list(tmp_path.iterdir())


def test_eval_settings_refuse_what_the_flags_refuse():
    from preftune.errors import ConfigError
    from preftune.evaluation.settings import EvalSettings

    for bad in ({"batch_size": -2}, {"samples": -1}, {"max_new_tokens": 0}, {"beta": float("nan")}):
        with pytest.raises(ConfigError, match=f"eval.{next(iter(bad))}"):
            EvalSettings(**bad)


@pytest.mark.parametrize(
    "name, records, settings, expected",
    [
        ("all-identical", [{**GOOD, "rejected": GOOD["chosen"]}] * 3, [], "every pair has chosen identical"),
        (
            "every-prompt-over-max-length",
            [{**GOOD, "prompt": "review of the park:" + " great" * 80}] * 3,
            ["--set", "data.max_length=16"],
            "every pair was dropped",
        ),
        ("empty-file", [], [], "no records"),
    ],
)
def test_check_data_gives_trains_verdict_and_exit_code(
    tmp_path, capsys, model_dir, name, records, settings, expected
):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(*records))
    check = main(["check-data", str(data), "--model", str(model_dir), *settings])
    checked = capsys.readouterr().err
    train = main(
        ["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o"), *settings]
    )
    trained = capsys.readouterr().err
    assert check == train == 2
    verdict = [line for line in checked.splitlines() if line.startswith("preftune: error:")]
    assert verdict == [line for line in trained.splitlines() if line.startswith("preftune: error:")]
    assert expected in verdict[0]


def test_a_control_character_in_a_json_string_is_named_once(tmp_path, capsys, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, '{"prompt": "a\tb", "chosen": " x", "rejected": " y"}'))
    assert main(["check-data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2: malformed JSON (Invalid control character at column 14)" in err
    assert " at at " not in err


def test_one_blown_up_step_is_not_saved_as_final_and_says_why(tmp_path, capsys, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, OTHER))
    output = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output)]
    settings = [
        "--set",
        "train.max_steps=1",
        "--set",
        "train.learning_rate=1e20",
        "--set",
        "train.max_grad_norm=null",
    ]
    assert main([*argv, *settings, "--set", "train.save_every=null"]) == 2
    err = one_error_line(capsys)
    assert "final: not saved, weight tensor" in err[-1] and "the training diverged" in err[-1], err
    assert not (output / "final").exists()


def test_an_ordinary_run_passes_the_magnitude_guard(tmp_path, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, OTHER))
    output = tmp_path / "out"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output)]
    assert main([*argv, "--set", "train.max_steps=2", "--set", "train.learning_rate=1e-3"]) == 0
    assert (output / "final" / "config.json").exists()


def test_preftunes_own_warnings_are_one_line_each_like_its_errors():
    import preftune.cli as cli
    import preftune.data.prepare as prepare

    ours = cli._format_warning("d.jsonl:2: pair dropped", UserWarning, prepare.__file__, 276, "x = 1")
    theirs = cli._format_warning("deprecated", FutureWarning, "/elsewhere/lib.py", 3, "y = 2")
    assert ours == "preftune: warning: d.jsonl:2: pair dropped\n"
    assert theirs.startswith("/elsewhere/lib.py:3: FutureWarning: deprecated")
