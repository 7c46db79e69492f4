"""``preftune eval``: figures worked by hand, a policy trained to lower chosen likelihood, the
command line end to end, and one clear message for each kind of bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.config import DataConfig
from preftune.data import TokenizedPair, prepare_pairs
from preftune.data.layouts import collate_pairs
from preftune.errors import DataError
from preftune.evaluation.evaluate import EvalSet, evaluate, load_sets, parse_data_specs, set_report
from preftune.evaluation.report import format_table
from preftune.experiments.synthetic import build_tokenizer, tiny_llama
from preftune.model.logps import LogpsRequest, sequence_logps
from preftune.model.set_logps import PairLogps, pair_logps

REQUIRED = {
    "dpo_rm_accuracy",
    "ex_rm_accuracy",
    "ranking_consistency_policy",
    "ranking_consistency_reference",
    "chosen_logp_drift",
    "rejected_logp_drift",
    "chosen_fell_share",
    "drift_by_edit_distance",
}


def side(logps_w, logps_l, tokens_w, tokens_l) -> PairLogps:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(logps_w), t(logps_l), t(tokens_w), t(tokens_l), t([1.0] * 3), t([2.0] * 3))


# The three pairs of tests/test_metrics.py: π = (−10, −20), (−30, −12), (−8, −6); ρ = (−12, −15),
# (−25, −10), (−7, −9); |y| = (5, 5), (10, 3), (2, 3). Drift (+2, −5), (−5, −2), (−1, +3):
# DPO-RM ranks pair 1 only; the chosen likelihood fell in pairs 2 and 3.
POLICY = side([-10, -30, -8], [-20, -12, -6], [5, 10, 2], [5, 3, 3])
REFERENCE = side([-12, -25, -7], [-15, -10, -9], [5, 10, 2], [5, 3, 3])
# Completions differing in 1, 1 and 3 tokens: edit-distance buckets "1" (pairs 1, 2) and "3–4" (pair 3).
PAIRS = [
    TokenizedPair([1], [5, 6, 7, 2], [5, 9, 7, 2], 0, "f:1"),
    TokenizedPair([1], [5, 6, 2], [5, 6, 7, 2], 1, "f:2"),
    TokenizedPair([1], [5, 6, 7, 2], [8, 8, 8, 2], 2, "f:3"),
]


def test_set_figures_worked_by_hand():
    rewards = ([1.0, 0.0, 3.0], [0.5, 2.0, 1.0])  # EX-RM margins +0.5, −2, +2: two of three right
    summary, rows = set_report(PAIRS, POLICY, REFERENCE, rewards, beta=0.1)
    assert summary["pairs"] == 3
    assert summary["dpo_rm_accuracy"] == pytest.approx(1 / 3)
    # β · mean((+2 − −5), (−5 − −2), (−1 − 3)) = 0.1 · (7 − 3 − 4) / 3 = 0
    assert summary["dpo_rm_margin"] == pytest.approx(0.0)
    assert summary["ex_rm_accuracy"] == pytest.approx(2 / 3)
    assert summary["ex_rm_margin"] == pytest.approx(0.5 / 3 - 0.0)
    assert summary["chosen_logp_drift"] == pytest.approx(-4 / 3)
    assert summary["rejected_logp_drift"] == pytest.approx(-4 / 3)
    assert summary["chosen_fell_share"] == pytest.approx(2 / 3)
    assert summary["ranking_consistency_policy"] == pytest.approx(2 / 3)
    assert summary["ranking_consistency_reference"] == pytest.approx(2 / 3)
    assert summary["dpo_rm_accuracy_length_normalized"] == pytest.approx(2 / 3)
    assert summary["dpo_rm_accuracy_ref_free_sum"] == pytest.approx(1 / 3)
    assert summary["dpo_rm_accuracy_ref_free_norm"] == 1.0  # every chosen norm (1) < rejected (2)
    assert [r["edit_distance"] for r in rows] == [1, 1, 3]
    assert summary["mean_edit_distance"] == pytest.approx(5 / 3)
    assert summary["drift_by_edit_distance"] == [
        {
            "edit_distance": "1",
            "low": 1,
            "high": 1,
            "pairs": 2,
            "chosen_logp_drift": pytest.approx(-1.5),
            "rejected_logp_drift": pytest.approx(-3.5),
            "chosen_fell_share": 0.5,
        },
        {
            "edit_distance": "3–4",
            "low": 3,
            "high": 4,
            "pairs": 1,
            "chosen_logp_drift": pytest.approx(-1.0),
            "rejected_logp_drift": pytest.approx(3.0),
            "chosen_fell_share": 1.0,
        },
    ]


def test_without_reference_or_reward_only_reference_free_figures_are_given():
    summary, rows = set_report(PAIRS, POLICY, None, None, beta=0.1)
    assert summary["dpo_rm_accuracy"] is None and summary["chosen_logp_drift"] is None
    assert summary["ex_rm_accuracy"] is None and summary["drift_by_edit_distance"] == []
    assert summary["ranking_consistency_policy"] == pytest.approx(2 / 3)
    assert "chosen_logp_drift" not in rows[0]
    table = format_table({"sets": {"heldout": summary}})
    assert "DPO-RM accuracy" in table and "—" in table


def records(n: int = 6) -> list[dict[str, str]]:
    words = ["great", "calm", "kind", "dull", "cold", "rude"]
    return [
        {
            "prompt": f"review of the park {i}:",
            "chosen": f" {words[i % 3]} day",
            "rejected": f" {words[3 + i % 3]}",
        }
        for i in range(n)
    ]


def test_a_policy_trained_to_lower_chosen_likelihood_shows_a_negative_drift(tokenizer):
    reference = tiny_llama(len(tokenizer), seed=0)
    policy = copy.deepcopy(reference)
    pairs, _ = prepare_pairs(records(), tokenizer, DataConfig(), progress=False)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(5):  # gradient descent on log p(chosen): its likelihood can only fall
        loss = sequence_logps(policy, batch).logps[batch.chosen].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    eval_set = EvalSet("train", "records", pairs, [])
    report = evaluate(policy, tokenizer, [eval_set], reference).summary["sets"]["train"]
    assert report["chosen_logp_drift"] < -1.0
    assert report["chosen_fell_share"] == 1.0
    unchanged = evaluate(reference, tokenizer, [eval_set], reference).summary["sets"]["train"]
    assert unchanged["chosen_logp_drift"] == 0.0 and unchanged["chosen_fell_share"] == 0.0


def test_pair_logps_batches_longest_first_and_answers_in_the_pairs_order(tokenizer):
    model = tiny_llama(len(tokenizer), seed=0)
    pairs, _ = prepare_pairs(records(5), tokenizer, DataConfig(), progress=False)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        whole = sequence_logps(model, batch, LogpsRequest(per_token=True))
    norms = torch.zeros(batch.num_sequences).index_add(0, batch.label_sequence, whole.token_logps**2).sqrt()
    got = pair_logps(model, pairs, tokenizer.pad_token_id, batch_size=2)
    assert got.chosen.tolist() == pytest.approx(whole.logps[batch.chosen].tolist(), abs=1e-5)
    assert got.rejected.tolist() == pytest.approx(whole.logps[batch.rejected].tolist(), abs=1e-5)
    assert got.rejected_tokens.tolist() == whole.tokens[batch.rejected].tolist()
    assert got.chosen_norm.tolist() == pytest.approx(norms[batch.chosen].tolist(), abs=1e-5)


def test_data_specs_are_named_sets():
    assert parse_data_specs(["id=a.jsonl", "b/heldout.jsonl"]) == [
        ("id", "a.jsonl"),
        ("heldout", "b/heldout.jsonl"),
    ]
    with pytest.raises(DataError, match="'id' is used twice"):
        parse_data_specs(["id=a.jsonl", "id=b.jsonl"])
    with pytest.raises(DataError, match="expected NAME=FILE"):
        parse_data_specs(["=a.jsonl"])


def test_sets_keep_the_texts_of_the_pairs_they_keep(tokenizer):
    data = [*records(3), {"prompt": "p", "chosen": " same", "rejected": " same"}]
    (eval_set,) = load_sets([("id", data)], tokenizer, DataConfig(identical_pairs="drop"))
    assert len(eval_set.pairs) == len(eval_set.examples) == 3
    assert eval_set.examples[2].chosen == data[2]["chosen"]


# --------------------------------------------------------------------------- the command line


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """A tiny policy, its reference, a model with another tokenizer, pairs and reward functions."""
    root = tmp_path_factory.mktemp("eval")
    for name, seed in (("policy", 1), ("reference", 0)):
        tokenizer.save_pretrained(root / name)
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(root / name)
    other = build_tokenizer(vocab_size=300)
    other.save_pretrained(root / "other")
    tiny_llama(len(other)).save_pretrained(root / "other")
    write_jsonl(root / "id.jsonl", records(6))
    write_jsonl(root / "shift.jsonl", records(4)[::-1])
    (root / "rewards.py").write_text(
        "def good(prompts, completions):\n    return [float(len(c)) for c in completions]\n"
        "def raises(prompts, completions):\n    raise ValueError('no model loaded')\n"
        "def short(prompts, completions):\n    return [1.0]\n"
    )
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_writes_json_table_pairs_and_plots(folders, tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "eval",
        "--policy", str(folders / "policy"),
        "--reference", str(folders / "reference"),
        "--reward", f"{folders / 'rewards.py'}:good",
        "--data", f"id={folders / 'id.jsonl'}",
        "--data", f"prompt_shift={folders / 'shift.jsonl'}",
        "--samples", "2", "--max-new-tokens", "4",
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert list(summary["sets"]) == ["id", "prompt_shift"]
    report = summary["sets"]["id"]
    assert set(report) >= REQUIRED and report["pairs"] == 6
    assert 0 <= report["dpo_rm_accuracy"] <= 1 and 0 <= report["ex_rm_accuracy"] <= 1
    samples = report["samples"]
    assert samples["prompts"] == 6 and samples["samples_per_prompt"] == 2
    assert samples["kl_policy_reference"] is not None and 0 <= samples["win_rate_policy_vs_reference"] <= 1
    for png in ("accuracy.png", "drift_by_edit_distance.png", "drift_histogram.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5_000
    rows = (tmp_path / "out" / "pairs" / "id.jsonl").read_text().splitlines()
    assert len(rows) == 6 and "chosen_logp_drift" in json.loads(rows[0])
    assert "DPO-RM accuracy" in out and "prompt_shift" in out and "samples: KL" in out


def test_eval_of_a_policy_against_itself_has_no_drift_and_no_kl(folders, tmp_path, capsys):
    same = str(folders / "reference")
    argv = ["eval", "--policy", same, "--reference", same, "--data", f"id={folders / 'id.jsonl'}"]
    code, _, _ = run(capsys, *argv, "--samples", "1", "--max-new-tokens", "3", "--output", str(tmp_path))
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())["sets"]["id"]
    assert report["chosen_logp_drift"] == 0.0 and report["chosen_fell_share"] == 0.0
    assert report["dpo_rm_accuracy"] == 0.0  # a tie is not a win
    assert report["samples"]["kl_policy_reference"] == 0.0
    assert report["ranking_consistency_policy"] == report["ranking_consistency_reference"]


@pytest.mark.parametrize(("setting", "layout"), [((), "packed"), (("--set", "data.layout=padded"), "padded")])
def test_eval_batches_pairs_in_the_configs_layout(folders, tmp_path, capsys, monkeypatch, setting, layout):
    import preftune.model.set_logps

    used, original = [], preftune.model.set_logps.collate_for
    monkeypatch.setattr(
        preftune.model.set_logps, "collate_for", lambda name, *a: used.append(name) or original(name, *a)
    )
    argv = ["eval", "--policy", str(folders / "policy"), "--reference", str(folders / "reference")]
    code, _, _ = run(
        capsys, *argv, "--data", f"id={folders / 'id.jsonl'}", "--output", str(tmp_path), *setting
    )
    assert code == 0 and used == [layout, layout]  # the policy's pairs, then the reference's


def bad_eval(capsys, folders, tmp_path, *extra: str, data: str = "id.jsonl") -> str:
    argv = ["eval", "--policy", str(folders / "policy"), "--data", f"id={folders / data}"]
    code, _, err = run(capsys, *argv, "--output", str(tmp_path / "out"), *extra)
    assert code == 2
    assert not (tmp_path / "out").exists()  # nothing half-written
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preftune: error: ")
    return lines[0]


def test_a_set_with_a_missing_field_names_file_line_and_field(folders, tmp_path, capsys):
    write_jsonl(folders / "broken.jsonl", [records(1)[0], {"prompt": "p", "chosen": " a"}])
    message = bad_eval(capsys, folders, tmp_path, data="broken.jsonl")
    assert "broken.jsonl:2: missing field 'rejected'" in message


def test_a_reference_with_another_tokenizer_is_refused(folders, tmp_path, capsys):
    message = bad_eval(capsys, folders, tmp_path, "--reference", str(folders / "other"))
    assert "its tokenizer differs from the policy's" in message


def test_a_reward_function_that_raises_is_named(folders, tmp_path, capsys):
    message = bad_eval(capsys, folders, tmp_path, "--reward", f"{folders / 'rewards.py'}:raises")
    assert "raised ValueError: no model loaded" in message


def test_a_reward_function_with_the_wrong_shape_is_named(folders, tmp_path, capsys):
    message = bad_eval(capsys, folders, tmp_path, "--reward", f"{folders / 'rewards.py'}:short")
    assert "returned 1 scores for 12 completions" in message


def test_samples_without_a_reference_are_refused(folders, tmp_path, capsys):
    message = bad_eval(capsys, folders, tmp_path, "--samples", "2")
    assert "--samples" in message and "--reference" in message
