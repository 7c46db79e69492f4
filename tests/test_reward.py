"""Bradley–Terry reward models: the loss, where the score is read, training, scoring, bad input."""

import json
import math

import pytest
import torch
from helpers import quiet_config, sentiment_records
from transformers import AutoModelForSequenceClassification

from preftune.cli import main
from preftune.config import DataConfig
from preftune.data import prepare_pairs
from preftune.data.layouts import collate_pairs
from preftune.errors import DataError, ScorerError
from preftune.experiments.synthetic import SentimentTask, build_tokenizer, tiny_llama, tiny_reward_model
from preftune.generation.rewards import load_scorer
from preftune.generation.scoring import FunctionScorer, RewardModelScorer
from preftune.model.reward_head import sequence_rewards
from preftune.recipes.common import load_pairs
from preftune.recipes.reward import bradley_terry_loss, train_reward_model

RECORDS = sentiment_records(16, seed=3)


class FixedRewards(torch.nn.Module):
    """A stand-in reward model returning given per-sequence rewards."""

    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def forward(self, batch):
        return self.rewards


def _pairs(tokenizer, records, **overrides):
    pairs, _ = prepare_pairs(
        records, tokenizer, DataConfig(**overrides), progress=False, margin_field="margin"
    )
    return pairs


# --------------------------------------------------------------------------- the loss


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_reward_difference(tokenizer):
    """Rewards chosen (1.0, −0.5), rejected (0.2, 0.5): −log σ(0.8) = 0.371101, −log σ(−1.0) = 1.313262."""
    batch = collate_pairs(_pairs(tokenizer, RECORDS[:2]), tokenizer.pad_token_id)
    losses, metrics = bradley_terry_loss(None)(FixedRewards([1.0, -0.5, 0.2, 0.5]), batch)
    assert losses.tolist() == pytest.approx([0.371101, 1.313262], abs=1e-6)
    assert metrics["accuracy"].tolist() == [1.0, 0.0]
    assert metrics["margin"].tolist() == pytest.approx([0.8, -1.0])
    assert (metrics["min_reward"].item(), metrics["max_reward"].item()) == (-0.5, 1.0)
    assert metrics["mean_reward"].item() == pytest.approx(0.3)


def test_margin_column_is_subtracted_inside_the_sigmoid(tokenizer):
    """Δ = 0.8 with margin m = 0.5: −log σ(0.3) = 0.554355."""
    records = [{**RECORDS[0], "margin": 0.5}]
    batch = collate_pairs(_pairs(tokenizer, records), tokenizer.pad_token_id)
    losses, _ = bradley_terry_loss(None)(FixedRewards([1.0, 0.2]), batch)
    assert losses.item() == pytest.approx(0.554355, abs=1e-6)


def test_centering_adds_c_times_the_squared_reward_sum(tokenizer):
    """c = 0.01, r_w + r_l = 1.2: −log σ(0.8) + 0.01 · 1.44 = 0.385501."""
    batch = collate_pairs(_pairs(tokenizer, RECORDS[:1]), tokenizer.pad_token_id)
    losses, _ = bradley_terry_loss(0.01)(FixedRewards([1.0, 0.2]), batch)
    assert losses.item() == pytest.approx(0.371101 + 0.0144, abs=1e-6)


# --------------------------------------------------------------------------- where the score is read


def _rows(tokenizer):
    texts = ["review of the park: great calm</s>", "hi</s>", "review of the book: dull rude bleak cold</s>"]
    return [tokenizer(t)["input_ids"] for t in texts]


def _padded(rows, pad_id, left):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def test_score_is_read_at_the_last_token_with_left_right_or_no_padding(tokenizer):
    model = tiny_reward_model(len(tokenizer), seed=1).eval()
    rows = _rows(tokenizer)
    alone = torch.cat(
        [sequence_rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
    )
    for left in (False, True):
        ids, mask = _padded(rows, tokenizer.pad_token_id, left)
        torch.testing.assert_close(sequence_rewards(model, ids, mask), alone, rtol=1e-5, atol=1e-5)


def test_a_tokenizer_without_pad_token_pads_with_eos_and_still_reads_the_final_eos():
    """With pad = eos, transformers' own pooling skips every trailing EOS and reads one token early;
    preftune reads the position from the attention mask."""
    tokenizer = build_tokenizer()
    tokenizer.pad_token = None
    from preftune.config import ModelConfig
    from preftune.model.load import prepare_tokenizer

    tokenizer = prepare_tokenizer(tokenizer, ModelConfig())
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model = tiny_reward_model(len(tokenizer), seed=2).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    rows = _rows(tokenizer)
    alone = torch.cat(
        [sequence_rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
    )
    ids, mask = _padded(rows, tokenizer.pad_token_id, left=False)
    torch.testing.assert_close(sequence_rewards(model, ids, mask), alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        transformers_pooled = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert not torch.allclose(transformers_pooled, alone, atol=1e-4)  # the bug preftune avoids


def test_scoring_appends_eos_exactly_as_training_did(tmp_path, tokenizer):
    """The scorer's row for (prompt, completion) equals the training row of that side of a pair."""
    folder = tmp_path / "rm"
    tiny_reward_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    scorer = RewardModelScorer(str(folder), device="cpu")
    pair = _pairs(tokenizer, RECORDS[:1])[0]
    assert scorer.encode(RECORDS[0]["prompt"], RECORDS[0]["chosen"]) == pair.prompt_ids + pair.chosen_ids
    assert (
        scorer.encode(RECORDS[0]["prompt"], RECORDS[0]["chosen"] + "</s>")
        == pair.prompt_ids + pair.chosen_ids
    )


# --------------------------------------------------------------------------- training


def test_reward_model_on_noisy_synthetic_pairs_reaches_near_the_bayes_ceiling(tmp_path, tokenizer):
    """Labels are Bradley–Terry draws on the true reward, so no model can beat the Bayes accuracy
    (0.918 on these held-out pairs); chance is 0.5. Measured: 0.887 after 64 steps."""
    task = SentimentTask()
    train_records, _ = task.bradley_terry_pairs(1024, seed=0)
    held_out, bayes = task.bradley_terry_pairs(256, seed=1)
    cfg = quiet_config(
        str(tmp_path / "rm"),
        "train.batch_size=32",
        "train.max_steps=64",
        "train.learning_rate=3e-3",
        "train.warmup_steps=5",
        "train.log_every=16",
    )
    result = train_reward_model(
        cfg,
        model=tiny_reward_model(len(tokenizer)),
        tokenizer=tokenizer,
        train_data=train_records,
        eval_data=held_out,
    )
    accuracy = result.history[-1]["eval_accuracy"]
    assert bayes == pytest.approx(0.918, abs=0.005)
    assert 0.8 < accuracy <= bayes + 0.03
    for name in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward", "num_tokens"):
        assert name in result.history[0]


@pytest.mark.parametrize("shape", ["conversational", "implicit prompt"])
def test_reward_models_train_on_every_record_shape_train_reads(tmp_path, tokenizer, shape):
    if shape == "conversational":
        records = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in RECORDS[:8]
        ]
    else:
        records = [
            {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
            for r in RECORDS[:8]
        ]
    cfg = quiet_config(str(tmp_path / "rm"), "train.batch_size=4", "train.max_steps=2")
    result = train_reward_model(
        cfg, model=tiny_reward_model(len(tokenizer)), tokenizer=tokenizer, train_data=records
    )
    assert result.data_report.kept == 8 and math.isfinite(result.history[-1]["loss"])


def test_interrupted_reward_model_run_resumes_with_the_uninterrupted_losses(tmp_path, tokenizer):
    settings = ("train.batch_size=4", "train.max_steps=6", "train.save_every=2")

    def run(name, *extra, **kwargs):
        cfg = quiet_config(str(tmp_path / name), *settings, *extra)
        return train_reward_model(
            cfg,
            model=tiny_reward_model(len(tokenizer), seed=4),
            tokenizer=tokenizer,
            train_data=RECORDS,
            **kwargs,
        )

    full = run("full")
    run("cut", stop_after=3)
    resumed = run("cut", "train.resume=true")
    expected = {h["step"]: h["loss"] for h in full.history}
    assert {h["step"]: h["loss"] for h in resumed.history} == {s: expected[s] for s in (3, 4, 5, 6)}
    assert resumed.history[-1]["num_tokens"] == full.history[-1]["num_tokens"]


def test_lora_reward_model_final_folder_scores_like_the_trained_model(tmp_path, tokenizer):
    cfg = quiet_config(
        str(tmp_path / "lora"), "train.batch_size=4", "train.max_steps=3", "model.lora=true", "model.lora_r=4"
    )
    result = train_reward_model(
        cfg, model=tiny_reward_model(len(tokenizer), seed=5), tokenizer=tokenizer, train_data=RECORDS
    )
    loaded = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    fresh = tiny_reward_model(len(tokenizer), seed=5).eval()
    ids, mask = _padded(_rows(tokenizer), tokenizer.pad_token_id, left=False)
    scores = sequence_rewards(loaded, ids, mask)
    assert not torch.allclose(scores, sequence_rewards(fresh, ids, mask))  # the head and adapters trained
    pair = _pairs(tokenizer, RECORDS[:1])[0]
    row = torch.tensor([pair.prompt_ids + pair.chosen_ids])
    expected = sequence_rewards(loaded, row, torch.ones_like(row)).item()
    scorer = RewardModelScorer(str(result.final_dir), device="cpu")
    assert scorer([RECORDS[0]["prompt"]], [RECORDS[0]["chosen"]])[0] == pytest.approx(expected, abs=1e-5)


def test_final_folder_has_a_model_card_naming_model_data_objective_and_metrics(tmp_path, tokenizer):
    cfg = quiet_config(str(tmp_path / "card"), "train.batch_size=4", "train.max_steps=2")
    result = train_reward_model(
        cfg, model=tiny_reward_model(len(tokenizer)), tokenizer=tokenizer, train_data=RECORDS
    )
    card = (result.final_dir / "README.md").read_text()
    assert "Bradley–Terry" in card and "| accuracy |" in card and "learning rate | 0.001" in card


# --------------------------------------------------------------------------- the command line and bad input


@pytest.fixture()
def causal_lm_folder(tmp_path, tokenizer):
    folder = tmp_path / "base"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


QUIET = ["--set", "train.progress=false", "--set", "train.report_to=none", "--set", "train.max_steps=2"]


def test_rm_train_from_a_causal_lm_adds_a_head_and_rm_score_reports_accuracy_per_subset(
    tmp_path, causal_lm_folder, capsys
):
    data = _jsonl(tmp_path / "pairs.jsonl", RECORDS)
    out = tmp_path / "rm"
    assert (
        main(
            [
                "rm",
                "train",
                "--model",
                str(causal_lm_folder),
                "--data",
                str(data),
                "--output",
                str(out),
                *QUIET,
            ]
        )
        == 0
    )
    assert "has no reward head; a new one" in capsys.readouterr().out
    scored = _jsonl(
        tmp_path / "bench.jsonl",
        [{**r, "subset": "chat" if i % 2 else "safety"} for i, r in enumerate(RECORDS)],
    )
    scores_path = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "rm",
                "score",
                "--model",
                str(out / "final"),
                "--data",
                str(scored),
                "--output",
                str(scores_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "accuracy (chosen scored above rejected)" in printed and "safety" in printed
    rows = [json.loads(line) for line in scores_path.read_text().splitlines()]
    assert len(rows) == len(RECORDS) and {"chosen_score", "rejected_score", "correct", "subset"} <= set(
        rows[0]
    )
    assert rows[0]["correct"] == (rows[0]["chosen_score"] > rows[0]["rejected_score"])


def test_rm_score_scores_prompt_and_completion_records(tmp_path, causal_lm_folder):
    model = AutoModelForSequenceClassification.from_pretrained(causal_lm_folder, num_labels=1)
    model.save_pretrained(tmp_path / "rm")
    build_tokenizer().save_pretrained(tmp_path / "rm")
    data = _jsonl(tmp_path / "single.jsonl", [{"prompt": "review of the park:", "completion": " great"}])
    assert (
        main(
            [
                "rm",
                "score",
                "--model",
                str(tmp_path / "rm"),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "s.jsonl"),
            ]
        )
        == 0
    )
    assert math.isfinite(json.loads((tmp_path / "s.jsonl").read_text())["score"])


def test_a_model_path_that_is_neither_a_reward_model_nor_a_causal_lm_is_refused(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", RECORDS)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"model_type": "not-a-model"}')
    build_tokenizer().save_pretrained(junk)
    assert (
        main(
            [
                "rm",
                "train",
                "--model",
                str(junk),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
                *QUIET,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("preftune: error: model.name_or_path:")
        and "reward model" in err
        and "Traceback" not in err
    )
    assert not (tmp_path / "o").exists()


def test_a_model_folder_that_does_not_exist_is_named_not_mistaken_for_a_hub_id(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", RECORDS)
    missing = tmp_path / "no" / "such" / "model"
    assert (
        main(
            [
                "rm",
                "train",
                "--model",
                str(missing),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
                *QUIET,
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == f"preftune: error: model.name_or_path: {missing}: no such folder\n"


def test_a_margin_that_is_not_a_number_is_refused_naming_file_line_and_field(tmp_path, tokenizer):
    data = _jsonl(tmp_path / "pairs.jsonl", [{**RECORDS[0], "margin": 0.5}, {**RECORDS[1], "margin": "abc"}])
    with pytest.raises(DataError, match=rf"^{data}:2: field 'margin' must be a number, got 'abc'"):
        train_reward_model(
            quiet_config(str(tmp_path / "o")),
            model=tiny_reward_model(len(tokenizer)),
            tokenizer=tokenizer,
            train_data=str(data),
        )


# --------------------------------------------------------------------------- reward functions


def test_a_reward_function_is_imported_by_module_or_file_and_called_in_batches(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "calls = []\n"
        "def length(prompts, completions):\n"
        "    calls.append(len(prompts))\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    scorer = load_scorer("my_rewards:length")
    scorer.batch_size = 2
    assert scorer(["p"] * 3, ["a", "bb", "ccc"]) == [1.0, 2.0, 3.0]
    import my_rewards

    assert my_rewards.calls == [2, 1]
    assert load_scorer(f"{tmp_path / 'my_rewards.py'}:length")(["p"], ["abcd"]) == [4.0]


@pytest.mark.parametrize(
    "body, message",
    [
        ("raise RuntimeError('boom')", "raised RuntimeError: boom"),
        ("return [1.0]", "returned 1 scores for 2 completions"),
        ("return 'x'", "must return a list of 2 numbers"),
        ("return [1.0, float('nan')]", "non-finite score"),
    ],
)
def test_a_reward_function_that_misbehaves_ends_in_one_clear_message(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(f"def fn(prompts, completions):\n    {body}\n")
    with pytest.raises(ScorerError, match=message):
        FunctionScorer(f"{path}:fn")(["a", "b"], ["c", "d"])


@pytest.mark.parametrize("spec", ["no_such_module_xyz:fn", "json:no_such_function", "nothing-at-all"])
def test_a_scorer_that_cannot_be_found_is_refused(spec):
    with pytest.raises(ScorerError):
        load_scorer(spec)


def test_eval_pairs_of_a_reward_model_keep_their_margins(tmp_path, tokenizer):
    from preftune.engine import Harness

    harness = Harness(quiet_config(str(tmp_path / "o")))
    _, eval_pairs, _ = load_pairs(harness, tokenizer, RECORDS[:2], [{**RECORDS[2], "margin": 2}], "margin")
    assert eval_pairs[0].margin == 2.0
