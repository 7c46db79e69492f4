"""A corpus of malformed inputs, each run through the command line as a user would.

Every case must end in exit code 2 with one line on stderr that starts with
``preftune: error:`` and names the file and line (or the config key), no traceback, no
output folder created, and the input file unchanged.
"""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.cli import main
from preftune.experiments.synthetic import build_tokenizer, tiny_llama

GOOD = {"prompt": "review of the park:", "chosen": " great calm", "rejected": " dull"}
MESSAGES = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "assistant", "content": "go away"}],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lines(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def with_messages(**changes):
    return {**MESSAGES, **changes}


# (id, file name, content (text, bytes or a callable writing the file), extra CLI arguments, expected text)
DATA_CASES = [
    (
        "malformed-json",
        "d.jsonl",
        lines(GOOD, '{"prompt": "a" "chosen": "b"}'),
        [],
        "d.jsonl:2: malformed JSON",
    ),
    ("truncated-json", "d.jsonl", lines(GOOD, GOOD, '{"prompt": "a", "cho'), [], "d.jsonl:3: malformed JSON"),
    (
        "array-not-object",
        "d.jsonl",
        lines(GOOD, '["a", "b", "c"]'),
        [],
        "d.jsonl:2: expected a JSON object, got a JSON array",
    ),
    (
        "string-not-object",
        "d.jsonl",
        lines('"just text"'),
        [],
        "d.jsonl:1: expected a JSON object, got a string",
    ),
    (
        "trailing-comma",
        "d.jsonl",
        lines(GOOD, '{"prompt": "a", "chosen": " b", "rejected": " c",}'),
        [],
        "d.jsonl:2: malformed JSON",
    ),
    (
        "number-completion",
        "d.jsonl",
        lines({**GOOD, "chosen": 3}),
        [],
        "d.jsonl:1: field 'chosen' must be a string or a list of messages, got int",
    ),
    (
        "null-completion",
        "d.jsonl",
        lines(GOOD, {**GOOD, "rejected": None}),
        [],
        "d.jsonl:2: field 'rejected' must be a string or a list of messages, got null",
    ),
    (
        "object-completion",
        "d.jsonl",
        lines({**GOOD, "chosen": {"text": "x"}}),
        [],
        "d.jsonl:1: field 'chosen' must be a string",
    ),
    (
        "empty-completion",
        "d.jsonl",
        lines({**GOOD, "chosen": ""}),
        ["--set", "data.empty_completions=error"],
        "d.jsonl:1: field 'chosen' is an empty completion",
    ),
    (
        "blank-completion",
        "d.jsonl",
        lines(GOOD, {**GOOD, "rejected": "   "}),
        ["--set", "data.empty_completions=error"],
        "d.jsonl:2: field 'rejected' is an empty completion",
    ),
    (
        "missing-rejected",
        "d.jsonl",
        lines({"prompt": "a", "chosen": " b"}),
        [],
        "d.jsonl:1: missing field 'rejected'",
    ),
    (
        "missing-chosen",
        "d.jsonl",
        lines(GOOD, {"prompt": "a", "rejected": " b"}),
        [],
        "d.jsonl:2: missing field 'chosen'",
    ),
    (
        "renamed-field",
        "d.jsonl",
        lines({"question": "a", "good": " b", "bad": " c"}),
        [],
        "d.jsonl:1: missing field 'chosen' (fields present: bad, good, question)",
    ),
    (
        "no-shared-prefix",
        "d.jsonl",
        lines({"chosen": "yes", "rejected": "no"}),
        [],
        "d.jsonl:1: no field 'prompt'",
    ),
    (
        "mixed-text-and-messages",
        "d.jsonl",
        lines({**MESSAGES, "rejected": "no"}),
        [],
        "d.jsonl:1: fields 'chosen' and 'rejected' mix text and messages",
    ),
    (
        "prompt-text-completions-messages",
        "d.jsonl",
        lines({**MESSAGES, "prompt": "hi"}),
        [],
        "d.jsonl:1: field 'prompt' and field 'chosen' mix text and messages",
    ),
    (
        "message-without-content",
        "d.jsonl",
        lines(with_messages(chosen=[{"role": "assistant"}])),
        [],
        "d.jsonl:1: field 'chosen' message 0 must be an object with 'role' and 'content'",
    ),
    (
        "message-content-not-text",
        "d.jsonl",
        lines(with_messages(rejected=[{"role": "assistant", "content": 5}])),
        [],
        "d.jsonl:1: field 'rejected' message 0 'content' must be a string",
    ),
    (
        "sharegpt-roles",
        "d.jsonl",
        lines(with_messages(prompt=[{"role": "human", "content": "hi"}])),
        [],
        "d.jsonl:1: field 'prompt' message 0 has role 'human'",
    ),
    (
        "completion-user-turn",
        "d.jsonl",
        lines(with_messages(chosen=[{"role": "user", "content": "hello"}])),
        [],
        "d.jsonl:1: field 'chosen' message 0 has role 'user'; a completion holds the model's turns only",
    ),
    (
        "completion-system-turn",
        "d.jsonl",
        lines(
            with_messages(
                rejected=[{"role": "assistant", "content": "no"}, {"role": "system", "content": "x"}]
            )
        ),
        [],
        "d.jsonl:1: field 'rejected' message 1 has role 'system'; a completion holds the model's turns only",
    ),
    (
        "prompt-ends-with-assistant",
        "d.jsonl",
        lines(
            with_messages(prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hm"}])
        ),
        [],
        "d.jsonl:1: field 'prompt' ends with an assistant turn (message 1); a prompt ends where the model's "
        "answer starts, with a user or tool turn",
    ),
    (
        "message-not-object",
        "d.jsonl",
        lines(with_messages(chosen=["hello"])),
        [],
        "d.jsonl:1: field 'chosen' message 0 must be an object",
    ),
    (
        "not-utf8",
        "d.jsonl",
        lines(GOOD, GOOD).encode() + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n',
        [],
        "d.jsonl:3: not UTF-8 text",
    ),
    ("empty-file", "d.jsonl", "", [], "d.jsonl: no records"),
    ("blank-lines-only", "d.jsonl", "\n\n  \n", [], "d.jsonl: no records"),
    (
        "all-identical",
        "d.jsonl",
        lines({**GOOD, "rejected": GOOD["chosen"]}) * 3,
        [],
        "d.jsonl: every pair has chosen identical to rejected",
    ),
    (
        "identical-refused",
        "d.jsonl",
        lines(GOOD, {**GOOD, "rejected": GOOD["chosen"]}),
        ["--set", "data.identical_pairs=error"],
        "d.jsonl:2: field 'chosen' is identical to field 'rejected'",
    ),
    (
        "ten-megabyte-line",
        "d.jsonl",
        lines(GOOD, '{"prompt": "' + "x" * 10_000_000),
        [],
        "d.jsonl:2: malformed JSON",
    ),
    ("unsupported-suffix", "d.txt", lines(GOOD), [], "d.txt: unsupported file type '.txt'"),
    (
        "json-not-a-list",
        "d.json",
        json.dumps({"rows": [GOOD]}),
        [],
        "d.json: expected a JSON list of objects",
    ),
    (
        "json-item-not-object",
        "d.json",
        json.dumps([GOOD, 7]),
        [],
        "d.json: item 1: expected a JSON object, got int",
    ),
    ("json-malformed", "d.json", "[\n" + json.dumps(GOOD) + ",\n{oops}\n]", [], "d.json:3: malformed JSON"),
    ("json-not-utf8", "d.json", b'[\n{"prompt": "\xff"}\n]', [], "d.json:2: not UTF-8 text"),
    (
        "csv-missing-column",
        "d.csv",
        "prompt,chosen\nreview:, great\n",
        [],
        "d.csv:2: missing field 'rejected'",
    ),
    (
        "csv-extra-cells",
        "d.csv",
        "prompt,chosen,rejected\na, b, c, d\n",
        [],
        "d.csv:2: more values than the header has columns",
    ),
    (
        "csv-empty-cell",
        "d.csv",
        "prompt,chosen,rejected\nreview:, great,\n",
        ["--set", "data.empty_completions=error"],
        "d.csv:2: field 'rejected' is an empty completion",
    ),
    ("not-parquet", "d.parquet", "prompt,chosen,rejected\n", [], "d.parquet: not a readable Parquet file"),
    (
        "parquet-wrong-types",
        "d.parquet",
        lambda path: pq.write_table(pa.table({"prompt": ["a"], "chosen": [1], "rejected": [2]}), path),
        [],
        "d.parquet: row 0: field 'chosen' must be a string or a list of messages, got int",
    ),
    (
        "margin-not-a-number",
        "d.jsonl",
        lines({**GOOD, "margin": "big"}),
        ["rm"],
        "d.jsonl:1: field 'margin' must be a number, got 'big'",
    ),
]

ALIAS_BOMB = "train:\n  report_to:\n    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
"""A "billion laughs": nine lines standing for 9**9 values once expanded, under a key train reads."""

CONFIG_CASES = [
    (
        "unknown-key",
        ["--set", "train.learning_rat=1e-6"],
        "unknown key 'train.learning_rat' (did you mean 'learning_rate'?)",
    ),
    ("unknown-section", ["--set", "trian.seed=1"], "unknown key 'trian'"),
    ("wrong-type", ["--set", "train.batch_size=abc"], "train.batch_size: expected an integer, got 'abc'"),
    ("negative-beta", ["--set", "objective.beta=-0.1"], "objective.beta: must be > 0"),
    ("zero-learning-rate", ["--set", "train.learning_rate=0"], "train.learning_rate: must be > 0"),
    ("unknown-loss", ["--loss", "dpoo"], "objective.loss: unknown objective 'dpoo' (did you mean 'dpo'?)"),
    (
        "ignored-label-smoothing",
        ["--loss", "ipo", "--set", "objective.label_smoothing=0.1"],
        "objective.label_smoothing: 0.1 is ignored by 'ipo'",
    ),
    (
        "reference-needed",
        ["--set", "reference.strategy=none"],
        "reference.strategy: 'none' but objective 'sigmoid' needs a reference",
    ),
    (
        "prompt-limit-over-length",
        ["--set", "data.max_length=64", "--set", "data.max_prompt_length=64"],
        "data.max_prompt_length: must be < data.max_length",
    ),
    (
        "unknown-tracker",
        ["--set", "train.report_to=tensorbaord"],
        "train.report_to: unknown tracker 'tensorbaord'",
    ),
    (
        "missing-chat-template-file",
        ["--set", "data.chat_template=missing.jinja"],
        "data.chat_template: missing.jinja: no such file",
    ),
    ("bad-choice", ["--set", "train.scheduler=exponential"], "train.scheduler: 'exponential' is not one of"),
    (
        "set-list-duplicate-key",
        ["--set", "objective.loss=[{dpo: 1, dpo: 2}]"],
        "objective.loss: duplicate key '[0].dpo' (first on line 1)",
    ),
]


def _write(path, content):
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def _fails_cleanly(capsys, argv, expected, output):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: "), err
    assert expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not output.exists()


@pytest.mark.parametrize(
    "name, filename, content, extra, expected", DATA_CASES, ids=[c[0] for c in DATA_CASES]
)
def test_bad_data_ends_in_one_line_naming_file_and_line(
    tmp_path, capsys, model_dir, name, filename, content, extra, expected
):
    data = tmp_path / filename
    _write(data, content)
    before = data.read_bytes()
    command = ["rm", "train"] if extra[:1] == ["rm"] else ["train"]
    extra = extra[1:] if extra[:1] == ["rm"] else extra
    output = tmp_path / "out"
    argv = [*command, "--model", str(model_dir), "--data", str(data), "--output", str(output), *extra]
    _fails_cleanly(capsys, argv, expected, output)
    assert data.read_bytes() == before


@pytest.mark.parametrize("name, extra, expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_ends_in_one_line_naming_the_key(tmp_path, capsys, model_dir, name, extra, expected):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, GOOD))
    output = tmp_path / "out"
    _fails_cleanly(
        capsys,
        ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), *extra],
        expected,
        output,
    )


@pytest.mark.parametrize(
    "name, yaml_text, expected",
    [
        ("not-a-mapping", "- train\n- model\n", "expected a mapping of sections"),
        ("malformed", "train: [unclosed\n", "run.yaml:2: malformed YAML (expected"),
        ("section-not-mapping", "train: 3\n", "train: expected a section (mapping)"),
        (
            "duplicate-section",
            "train:\n  learning_rate: 1.0e-5\ndata:\n  max_length: 64\ntrain:\n  seed: 3\n",
            "run.yaml:5: duplicate key 'train' (first on line 1)",
        ),
        (
            "duplicate-key",
            "train:\n  learning_rate: 1.0e-5\n  seed: 3\n  learning_rate: 2.0e-5\n",
            "run.yaml:4: duplicate key 'train.learning_rate' (first on line 2)",
        ),
        ("alias-bomb", ALIAS_BOMB, "run.yaml:8: train.report_to[5]: its aliases expand to more than"),
        (
            "alias-in-its-own-anchor",
            "train:\n  report_to: &a [*a]\n",
            "run.yaml:2: train.report_to[0]: an alias inside its own anchor",
        ),
    ],
)
def test_bad_config_file_ends_in_one_line_naming_the_file(
    tmp_path, capsys, model_dir, name, yaml_text, expected
):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, GOOD))
    output = tmp_path / "out"
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(output),
        "--config",
        str(config),
    ]
    started = time.perf_counter()
    _fails_cleanly(capsys, argv, expected, output)
    assert time.perf_counter() - started < 5  # refused from the text, before a value is built
    assert config.read_text() == yaml_text


@pytest.mark.parametrize(
    "name, where, expected",
    [
        ("missing-data-file", "missing.jsonl", "missing.jsonl: no such file"),
        ("data-is-a-folder", "folder", "folder: is a folder"),
        ("missing-model-folder", "model", "model.name_or_path: {}: no such folder"),
        ("output-is-a-file", "output", "train.output_dir: {} is a file, not a folder"),
    ],
)
def test_bad_paths_end_in_one_line_naming_them(tmp_path, capsys, model_dir, name, where, expected):
    data, model, output = tmp_path / "d.jsonl", model_dir, tmp_path / "out"
    data.write_text(lines(GOOD, GOOD))
    if where == "missing.jsonl":
        data = tmp_path / "missing.jsonl"
    elif where == "folder":
        data = tmp_path / "folder"
        data.mkdir()
    elif where == "model":
        model = tmp_path / "no" / "such" / "model"
    else:
        output.write_text("a file")
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(output)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: ")
    assert expected.format(model if where == "model" else output) in err[0]
    if where != "output":
        assert not output.exists()


def test_a_byte_order_mark_is_accepted_in_every_text_format(tmp_path, model_dir):
    bom = "\ufeff"
    files = {
        "d.jsonl": bom + lines(GOOD, GOOD),
        "d.json": bom + json.dumps([GOOD, GOOD]),
        "d.csv": bom + "prompt,chosen,rejected\nreview:, great, dull\nreview:, calm, rude\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        argv = ["check-data", str(tmp_path / name)]
        assert main(argv) == 0, name


def test_the_corpus_covers_at_least_forty_malformed_inputs():
    assert len(DATA_CASES) + len(CONFIG_CASES) + 7 + 4 >= 40


# --------------------------------------------------------------------------- message roles, one rule everywhere

ASSISTANT_LAST = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hm"}]
USER_TURN = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
# command: its arguments, a record whose prompt ends with an assistant turn, one whose completion
# holds a user turn (None: the command reads prompts only) and that completion's field
ROLE_COMMANDS = {
    "train": (["train"], with_messages(prompt=ASSISTANT_LAST), with_messages(chosen=USER_TURN), "chosen"),
    "rm train": (
        ["rm", "train"],
        with_messages(prompt=ASSISTANT_LAST),
        with_messages(rejected=USER_TURN),
        "rejected",
    ),
    "kto": (
        ["train", "--loss", "kto"],
        {"prompt": ASSISTANT_LAST, "completion": MESSAGES["chosen"], "label": True},
        {"prompt": MESSAGES["prompt"], "completion": USER_TURN, "label": False},
        "completion",
    ),
    "sft": (
        ["sft"],
        {"prompt": ASSISTANT_LAST, "completion": MESSAGES["chosen"]},
        {"prompt": MESSAGES["prompt"], "completion": USER_TURN},
        "completion",
    ),
    "check-data": (
        ["check-data"],
        with_messages(prompt=ASSISTANT_LAST),
        with_messages(chosen=USER_TURN),
        "chosen",
    ),
    "online": (["online", "--reward", "rw:fn"], {"prompt": ASSISTANT_LAST}, None, ""),
    "ppo": (["ppo", "--reward", "rw:fn"], {"prompt": ASSISTANT_LAST}, None, ""),
}


@pytest.mark.parametrize("case", ["prompt-ends-with-assistant", "completion-with-a-user-turn"])
@pytest.mark.parametrize("command", sorted(ROLE_COMMANDS))
def test_message_roles_follow_one_rule_in_every_command(tmp_path, capsys, model_dir, command, case):
    argv, bad_prompt, bad_completion, field = ROLE_COMMANDS[command]
    record = bad_prompt if case.startswith("prompt") else bad_completion
    if record is None:
        pytest.skip(f"{command} reads prompts only")
    data, output = tmp_path / "d.jsonl", tmp_path / "out"
    data.write_text(lines(record))
    before = data.read_bytes()
    if command == "check-data":
        argv = [*argv, str(data), "--model", str(model_dir)]
    else:
        flag = "--prompts" if command in ("online", "ppo") else "--data"
        argv = [*argv, "--model", str(model_dir), flag, str(data), "--output", str(output)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = (
        "d.jsonl:1: field 'prompt' ends with an assistant turn (message 1)"
        if case.startswith("prompt")
        else f"d.jsonl:1: field '{field}' message 1 has role 'user'"
    )
    assert expected in err and "Traceback" not in err, err
    assert not output.exists()
    assert data.read_bytes() == before


def test_tool_turns_may_end_a_prompt_and_follow_a_tool_call_in_a_completion():
    from preftune.data.records import check_turns

    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
    }
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}, call]
    prompt.append({"role": "tool", "content": "42"})
    completion = [call, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42"}]
    check_turns(prompt, "prompt", {"chosen": completion, "rejected": MESSAGES["rejected"]}, "d.jsonl:1")
    check_turns("text prompts and completions have no turns", "prompt", {"chosen": " yes"}, "d.jsonl:1")
