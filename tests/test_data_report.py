"""``preftune check-data``'s data report: each figure against hand-worked pairs, each suggestion on
data built to trigger it and on data that should leave it quiet, and the command's outputs."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.cli import main
from preftune.config import DataConfig, RunConfig, load_config
from preftune.data import TokenizedPair, prepare_pairs
from preftune.evaluation.data_figures import (
    duplicate_figures,
    edit_figures,
    leakage_figures,
    length_figures,
    length_finding,
    off_policy_excess,
    ranking_finding,
    reference_figures,
    relative_edit_distance,
    reward_figures,
)
from preftune.evaluation.data_report import (
    ReportOptions,
    data_report,
    pair_keys,
    profile,
    reference_logps,
    sharded,
)
from preftune.experiments.common import substituted_pair
from preftune.experiments.synthetic import SentimentTask, build_tokenizer, tiny_llama
from preftune.model.set_logps import PairLogps, pair_logps, pair_logps_and_entropy


@pytest.fixture(scope="module")
def word_tokenizer():
    """The experiments' tokenizer: every task word is one token."""
    return build_tokenizer(vocab_size=512)


def pair(prompt, chosen, rejected, index=0, where=""):
    return TokenizedPair(list(prompt), list(chosen), list(rejected), index, where or f"d.jsonl:{index + 1}")


def fired(figures) -> dict[str, bool]:
    return {f["name"]: f["fires"] for f in figures["findings"]}


def own_samples(model, prompt, n, seed, eos=2):
    """``n`` samples of ``model`` after ``prompt`` (up to 6 tokens), each cut after its EOS."""
    torch.manual_seed(seed)
    rows = model.generate(torch.tensor([prompt] * n), do_sample=True, max_new_tokens=6, top_k=0, top_p=1.0)
    out = []
    for row in rows[:, len(prompt) :].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def peaked_model(tokenizer):
    """A tiny Llama whose next-token distributions are peaked: random text is far from what it writes."""
    model = tiny_llama(len(tokenizer), seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def report_of(records, tokenizer, options=None, identical=0):
    pairs, _ = prepare_pairs(records, tokenizer, DataConfig(), progress=False)
    options = options or ReportOptions()
    return data_report(records, pairs, tokenizer, RunConfig(), options, identical, say=lambda _: None)


# --------------------------------------------------------------------------- each figure, by hand


def test_relative_edit_distance_is_the_distance_over_the_longer_completion():
    assert relative_edit_distance(1, 20, 20) == 0.05
    assert relative_edit_distance(3, 2, 3) == 1.0
    assert relative_edit_distance(0, 0, 0) == 0.0


def test_edit_figures_give_the_share_within_k_tokens_and_the_near_identical_share():
    # distances 0 (identical), 1 of 20, 3 of 4, 10 of 12
    figures = edit_figures([0, 1, 3, 10], [20, 20, 4, 10], [20, 20, 4, 12])
    assert figures["within"] == {"1": 0.25, "2": 0.25, "4": 0.5, "8": 0.5, "16": 0.75}
    assert figures["near_identical"] == 0.25  # only 1 of 20: identical pairs have no gradient at all
    assert figures["median"] == 2.0 and figures["mean"] == 3.5
    assert [b["pairs"] for b in figures["buckets"]] == [1, 1, 1, 1]
    assert [b["edit_distance"] for b in figures["buckets"]] == ["0", "1", "3–4", "9–16"]


def test_length_figures_score_the_longer_is_chosen_rule_with_ties_as_half():
    figures = length_figures([5, 3, 4, 4], [3, 5, 4, 2])
    assert (figures["chosen_longer"], figures["rejected_longer"], figures["equal"]) == (0.5, 0.25, 0.25)
    assert figures["length_rule_accuracy"] == 0.625 and figures["signal"] == 0.625
    assert figures["preferred"] == "longer"
    assert figures["standard_error"] == pytest.approx(math.sqrt(0.625 * 0.375 / 4))


def test_the_shorter_is_chosen_rule_is_the_signal_when_chosen_is_mostly_shorter():
    figures = length_figures([2, 2, 2, 9], [5, 5, 5, 5])
    assert figures["length_rule_accuracy"] == 0.25 and figures["signal"] == 0.75
    assert figures["preferred"] == "shorter"


def test_off_policy_excess_is_the_surprise_above_the_entropy_per_token():
    excess = off_policy_excess(torch.tensor([-6.0, -3.0]), torch.tensor([4.0, 3.0]), torch.tensor([2.0, 3.0]))
    assert excess.tolist() == [1.0, 0.0]


def test_reference_figures_rank_by_average_and_by_summed_log_prob():
    logps = PairLogps(
        chosen=torch.tensor([-4.0, -10.0]),
        rejected=torch.tensor([-6.0, -8.0]),
        chosen_tokens=torch.tensor([2.0, 10.0]),
        rejected_tokens=torch.tensor([2.0, 4.0]),
        chosen_norm=torch.zeros(2),
        rejected_norm=torch.zeros(2),
        chosen_entropy=torch.tensor([3.0, 10.0]),  # excess 0.5 and 0
        rejected_entropy=torch.tensor([2.0, 2.0]),  # excess 2 and 1.5
    )
    figures = reference_figures(logps)
    assert figures["ranking_average"] == 1.0  # −2 > −3 and −1 > −2 per token
    assert figures["ranking_sum"] == 0.5  # −4 > −6, but −10 < −8
    assert figures["gap_sum"] == 0.0 and figures["gap_per_token"] == 1.0
    assert figures["far_off_policy"] == 0.5 and figures["median_excess_nats"] == 0.5


def test_reward_figures_count_ties_as_half_and_name_the_most_disputed_pairs_first():
    figures = reward_figures([1.0, 0.0, 0.5, -2.0], [0.0, 0.0, 2.0, 1.0], ["a:1", "a:2", "a:3", "a:4"])
    assert figures["agreement"] == 0.375 and figures["ties"] == 0.25
    assert figures["noise_estimate"] == 0.625
    assert [d["where"] for d in figures["disputed"]] == ["a:4", "a:3"]  # margins −3, −1.5


def test_duplicate_figures_find_repeated_and_contradicting_pairs_and_prompts_with_several_pairs():
    pairs = [
        pair([1], [2], [3], 0),
        pair([1], [2], [3], 1),  # a repeat of the first
        pair([1], [3], [2], 2),  # the first, swapped
        pair([9], [4], [5], 3),
    ]
    keys = np.array([pair_keys(p) for p in pairs]).T
    figures = duplicate_figures(keys[0], keys[1], keys[2], [p.where for p in pairs])
    assert figures["repeated_pairs"] == 1 and figures["repeated_first"] == ["d.jsonl:2"]
    assert figures["contradicting_pairs"] == 3  # each of the three has a swapped copy
    assert figures["distinct_prompts"] == 2 and figures["prompts_with_several_pairs"] == 1
    assert figures["most_pairs_per_prompt"] == 3


def test_a_prompt_and_completion_split_differently_is_another_pair():
    assert pair_keys(pair([1, 2], [3], [4]))[1] != pair_keys(pair([1], [2, 3], [4]))[1]


def test_leakage_figures_count_held_out_pairs_found_in_the_data_either_way_round():
    train = np.array([pair_keys(pair([1], [2], [3])), pair_keys(pair([7], [8], [9]))]).T
    held_out_pairs = [
        pair([1], [2], [3], 0, "h:1"),
        pair([7], [9], [8], 1, "h:2"),
        pair([1], [5], [6], 2, "h:3"),
    ]
    held = np.array([pair_keys(p) for p in held_out_pairs]).T
    figures = leakage_figures((train[0], train[1]), (held[0], held[1], held[2]), ["h:1", "h:2", "h:3"])
    assert figures["shared_pairs"] == 2 and figures["shared_first"] == ["h:1", "h:2"]
    assert figures["shared_prompts"] == 1.0


def test_the_sample_holds_every_pair_of_a_small_set_and_n_pairs_of_a_large_one_the_same_for_a_seed():
    pairs = [pair([1], [2, i], [3], i) for i in range(50)]
    assert [p.index for p in profile(pairs, 100).sampled()] == list(range(50))
    assert [p.index for p in profile(pairs, 0).sampled()] == list(range(50))  # 0: all
    some = [p.index for p in profile(pairs, 10, seed=1).sampled()]
    assert len(set(some)) == 10 and some == sorted(some)
    assert some == [p.index for p in profile(pairs, 10, seed=1).sampled()]
    assert some != [p.index for p in profile(pairs, 10, seed=2).sampled()]


def test_the_sample_is_uniform_over_the_pairs():
    hits = np.zeros(20)
    for seed in range(400):
        for p in profile([pair([1], [2], [3], i) for i in range(20)], 5, seed).sample:
            hits[p.index] += 1
    # each pair is kept with probability 1/4: 100 of 400 expected, standard deviation 8.7
    assert hits.min() > 65 and hits.max() < 135


def test_sharded_work_comes_back_in_the_order_of_the_items():
    assert sharded([3, 1, 2], lambda x: x, lambda share: [10 * x for x in share]) == [30, 10, 20]


def test_pair_logps_and_entropy_gives_pair_logps_and_each_completion_s_summed_entropy(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    pairs = [pair([1, 40, 41], [50, 51, 2], [52, 2], 0), pair([1, 42], [53, 2], [54, 55, 56, 2], 1)]
    got = pair_logps_and_entropy(model, pairs, tokenizer.pad_token_id)
    plain = pair_logps(model, pairs, tokenizer.pad_token_id)
    torch.testing.assert_close(got.chosen, plain.chosen)
    torch.testing.assert_close(got.rejected_norm, plain.rejected_norm)
    for i, p in enumerate(pairs):
        for completion, entropy in (
            (p.chosen_ids, got.chosen_entropy),
            (p.rejected_ids, got.rejected_entropy),
        ):
            with torch.no_grad():
                logits = model(torch.tensor([p.prompt_ids + completion])).logits[0].double()
            steps = logits[len(p.prompt_ids) - 1 : -1].log_softmax(-1)
            expected = -(steps.exp() * steps).sum()
            assert entropy[i].item() == pytest.approx(expected.item(), rel=1e-4)


def test_a_model_s_own_samples_are_on_policy_and_random_text_under_a_peaked_model_is_not(tokenizer):
    """The off-policy excess of the model's own samples averages 0 (E[−log p] = H at each step)."""
    model, prompt = peaked_model(tokenizer), [1, 40]
    samples = zip(own_samples(model, prompt, 200, 0), own_samples(model, prompt, 200, 1), strict=True)
    own = [pair(prompt, a, b, i) for i, (a, b) in enumerate(samples)]
    rng = random.Random(0)
    random_text = [pair(prompt, [rng.randrange(10, 300) for _ in range(6)], [2], i) for i in range(200)]
    on = reference_figures(reference_logps(model, own, tokenizer.pad_token_id, 50))
    off = reference_figures(reference_logps(model, random_text, tokenizer.pad_token_id, 50))
    assert abs(on["median_excess_nats"]) < 0.5 and on["far_off_policy"] < 0.25
    assert off["far_off_policy"] >= 0.5 and off["median_excess_nats"] > 2


# --------------------------------------------------------------------------- the suggestions


@pytest.mark.parametrize("k, fires", [(1, True), (8, True), (16, False)])
def test_the_drift_experiment_s_pairs_trigger_the_dpop_suggestion_up_to_k_8_and_not_at_16(
    word_tokenizer, k, fires
):
    """The likelihood-drift experiment measured DPO lowering log p(chosen) at k = 1–8 and raising it at 16."""
    rng = random.Random(k)
    records = [substituted_pair(SentimentTask(min_words=20, max_words=24), k, rng) for _ in range(64)]
    figures = report_of(records, word_tokenizer)
    assert figures["edit_distance"]["within"][str(k)] == 1.0
    assert fired(figures)["near-identical pairs"] is fires


def test_random_pairs_of_the_synthetic_task_trigger_no_suggestion_from_the_data_alone(word_tokenizer):
    records, _ = SentimentTask().bradley_terry_pairs(300, seed=1)
    assert not any(fired(report_of(records, word_tokenizer)).values())


def test_pairs_whose_chosen_is_longer_trigger_the_length_suggestion(word_tokenizer):
    records, _ = SentimentTask().bradley_terry_pairs(300, seed=1)
    for record in records[:120]:  # 70% of the pairs: the longer is chosen
        if len(record["chosen"]) <= len(record["rejected"]):
            record["chosen"] += " great calm"
    figures = report_of(records, word_tokenizer)
    finding = next(f for f in figures["findings"] if f["name"] == "length signal")
    assert finding["fires"] and "simpo" in finding["setting"] and "ld_alpha" in finding["setting"]


def test_a_length_lean_within_three_standard_errors_of_chance_does_not_trigger_the_length_suggestion():
    assert not length_finding(length_figures([3] * 7 + [1] * 3, [2] * 10), "tokens").fires  # 70% of 10
    assert length_finding(length_figures([3] * 70 + [1] * 30, [2] * 100), "tokens").fires  # 70% of 100


def test_labels_a_reward_model_disputes_in_a_quarter_of_the_pairs_trigger_the_robust_dpo_suggestion(
    word_tokenizer,
):
    task = SentimentTask()
    records, flip = [], random.Random(0)
    while len(records) < 300:
        prompt, a, b = "review of the park:", task.random_response(flip), task.random_response(flip)
        if task.true_reward(a) != task.true_reward(b):
            good, bad = (a, b) if task.true_reward(a) > task.true_reward(b) else (b, a)
            records.append({"prompt": prompt, "chosen": good, "rejected": bad})
    for record in records[::4]:  # 25% swapped
        record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    figures = report_of(
        records, word_tokenizer, ReportOptions(reward="preftune.experiments.synthetic:true_reward")
    )
    assert figures["reward"]["noise_estimate"] == pytest.approx(0.25)
    finding = next(f for f in figures["findings"] if f["name"] == "label noise")
    assert finding["fires"] and finding["setting"].startswith(
        "objective.loss=robust objective.label_smoothing=0.25"
    )
    disputed = [int(d["where"].split()[1]) for d in figures["reward"]["disputed"]]
    assert len(disputed) == 5 and all(i % 4 == 0 for i in disputed)  # swapped ones


def test_the_synthetic_task_s_bradley_terry_labels_leave_the_label_noise_suggestion_quiet(word_tokenizer):
    records, bayes = SentimentTask().bradley_terry_pairs(300, seed=1)
    figures = report_of(
        records, word_tokenizer, ReportOptions(reward="preftune.experiments.synthetic:true_reward")
    )
    assert figures["reward"]["agreement"] == pytest.approx(bayes, abs=0.06)  # noise as human labels have
    assert not fired(figures)["label noise"]


def test_labels_the_reward_model_mostly_reverses_suggest_checking_the_fields(word_tokenizer):
    records = [
        {"prompt": "review of the park:", "chosen": " dull cold", "rejected": " great kind"}
        for _ in range(30)
    ]
    figures = report_of(
        records, word_tokenizer, ReportOptions(reward="preftune.experiments.synthetic:true_reward")
    )
    finding = next(f for f in figures["findings"] if f["name"] == "label noise")
    assert finding["fires"] and "swapped" in finding["setting"]


def test_data_far_from_the_model_triggers_the_online_dpo_suggestion_and_its_own_samples_do_not(
    tokenizer, tmp_path
):
    model = peaked_model(tokenizer)
    model.save_pretrained(tmp_path / "peaked")
    tokenizer.save_pretrained(tmp_path / "peaked")
    prompt = tokenizer("review of the park:")["input_ids"]
    samples = zip(own_samples(model, prompt, 100, 0), own_samples(model, prompt, 100, 1), strict=True)
    own = [pair(prompt, a, b, i) for i, (a, b) in enumerate(samples)]
    records, _ = SentimentTask().bradley_terry_pairs(100, seed=1)
    off, _ = prepare_pairs(records, tokenizer, DataConfig(), progress=False)
    options = ReportOptions(model=str(tmp_path / "peaked"))
    config = load_config(base={"model.name_or_path": str(tmp_path / "peaked")})
    quiet = data_report(None, own, tokenizer, config, options, say=lambda _: None)
    loud = data_report(None, off, tokenizer, config, options, say=lambda _: None)
    assert fired(loud)["off-policy completions"] and not fired(quiet)["off-policy completions"]


def test_a_reference_ranking_near_chance_triggers_the_ranking_finding_and_a_clear_preference_does_not():
    base = {"ranking_sum": 0.5, "gap_sum": 0.0, "gap_per_token": 0.0}
    assert ranking_finding({**base, "ranking_average": 0.52}).fires
    assert not ranking_finding({**base, "ranking_average": 0.8}).fires


def test_repeated_pairs_trigger_the_duplicates_finding_and_distinct_pairs_do_not(word_tokenizer):
    records, _ = SentimentTask().bradley_terry_pairs(50, seed=1)
    assert not fired(report_of(records, word_tokenizer))["duplicates"]
    figures = report_of(records + records[:3], word_tokenizer)
    assert fired(figures)["duplicates"] and figures["duplicates"]["repeated_first"] == [
        "record 50",
        "record 51",
        "record 52",
    ]


# --------------------------------------------------------------------------- the command


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_check_data_writes_the_report_json_and_its_figure(word_tokenizer, tmp_path, capsys):
    records, _ = SentimentTask().bradley_terry_pairs(100, seed=1)
    word_tokenizer.save_pretrained(tmp_path / "tok")
    data = write(tmp_path / "d.jsonl", records)
    held = write(tmp_path / "h.jsonl", records[:10] + SentimentTask().bradley_terry_pairs(5, seed=9)[0])
    argv = ["check-data", data, "--model", str(tmp_path / "tok"), "--eval-data", held]
    assert main([*argv, "--output", str(tmp_path / "r" / "report.json")]) == 0
    out = capsys.readouterr().out
    assert (
        "data report: 100 pairs, in tokens; per-pair figures (edit distance, log-probs, rewards) on all 100"
        in out
    )
    assert f" ! held-out leakage: 10 of 15 pairs of {held} are training pairs" in out
    assert "holds a tokenizer only" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["leakage"]["shared_pairs"] == 10 and report["units"] == "tokens"
    assert {f["name"] for f in report["findings"]} >= {
        "near-identical pairs",
        "length signal",
        "held-out leakage",
    }
    assert (tmp_path / "r" / "report.png").stat().st_size > 10_000


def test_check_data_without_a_tokenizer_measures_in_words(tmp_path, capsys):
    records = [{"prompt": "q", "chosen": " a b c d", "rejected": " a b x d"}] * 3
    assert main(["check-data", write(tmp_path / "d.jsonl", records)]) == 0
    out = capsys.readouterr().out
    assert "chosen and rejected differ in 1 to k words: ≤1: 100.0%" in out
    assert " ! near-identical pairs: 100.0% of pairs" in out
    assert "try: objective.loss=dpop objective.dpop_lambda=5" in out
    assert " ! duplicates: 2 repeated pairs" in out


def test_check_data_gives_no_data_report_while_a_record_is_bad(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "chosen": " a", "rejected": " b"}\nnot json\n')
    assert main(["check-data", str(data)]) == 2
    assert "data report: given once every record is good" in capsys.readouterr().out


def test_sample_computes_the_costly_figures_on_n_pairs_and_says_so(tmp_path, capsys):
    records, _ = SentimentTask().bradley_terry_pairs(60, seed=1)
    output = tmp_path / "report.json"
    argv = ["check-data", write(tmp_path / "d.jsonl", records), "--sample", "20", "--output", str(output)]
    assert main(argv) == 0
    assert "on a uniform sample of 20 (--sample; seed 0)" in capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["edit_distance"]["pairs"] == 20 and report["length"]["pairs"] == 60


def test_check_data_scores_the_pairs_with_a_reward_function(tmp_path, capsys):
    records = [{"prompt": "q", "chosen": " great", "rejected": " dull"}] * 4
    records.append({"prompt": "q", "chosen": " dull", "rejected": " great"})
    data = write(tmp_path / "d.jsonl", records)
    assert main(["check-data", data, "--reward", "preftune.experiments.synthetic:true_reward"]) == 0
    out = capsys.readouterr().out
    assert "true_reward agrees with 80.0% of the labels: at most 20.0% label noise (± 17.9%;" in out
    assert f"most disputed: {data}:5\n" in out


@pytest.mark.slow
def test_two_processes_share_the_model_and_the_scorer_and_report_what_one_process_does(tokenizer, tmp_path):
    """``torchrun --nproc_per_node=2 -m preftune check-data``: each process computes a share of the
    log-probs and rewards, the main one alone prints and writes (about 30 s on two CPU cores)."""
    tiny_llama(len(tokenizer), seed=4).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records, _ = SentimentTask().bradley_terry_pairs(13, seed=3)
    data = write(tmp_path / "d.jsonl", records)
    argv = [
        "check-data",
        data,
        "--model",
        str(tmp_path / "model"),
        "--reward",
        "preftune.experiments.synthetic:true_reward",
    ]
    assert main([*argv, "--output", str(tmp_path / "one.json")]) == 0
    path = os.pathsep.join([str(Path(__file__).parent.parent / "src"), os.environ.get("PYTHONPATH", "")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [*torchrun, "-m", "preftune", *argv, "--output", str(tmp_path / "two.json")]
    launched = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("data report:") == 1 and launched.stdout.count("records, 13 valid") == 1
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["reward"] == one["reward"] and two["findings"] == one["findings"]
    for key, value in one["reference"].items():
        assert two["reference"][key] == pytest.approx(value, abs=1e-5), key


def test_a_file_whose_every_pair_is_dropped_has_no_data_report_figures_and_fails_as_train_would(
    tmp_path, capsys
):
    records = [{"prompt": "q", "chosen": " a", "rejected": " a"}] * 2
    argv = ["check-data", write(tmp_path / "d.jsonl", records), "--set", "data.identical_pairs=drop"]
    assert main(argv) == 2
    said = capsys.readouterr()
    assert "data report: no pair left to measure" in said.out
    assert "every pair has chosen identical to rejected" in said.err


def test_every_setting_a_finding_suggests_is_a_config_key_training_accepts():
    from preftune.evaluation.data_figures import (
        duplicates_finding,
        edit_finding,
        off_policy_finding,
        reward_finding,
    )
    from preftune.losses import build_objective

    swapped = reward_figures([0.0] * 10, [1.0] * 10, [f"a:{i}" for i in range(10)])
    some_noise = reward_figures(
        [1.0] * 70 + [0.0] * 30, [0.0] * 70 + [1.0] * 30, [f"a:{i}" for i in range(100)]
    )
    suggested = [
        edit_finding(edit_figures([1], [20], [20]), "tokens"),
        length_finding(length_figures([3] * 100, [2] * 100), "tokens"),
        ranking_finding({"ranking_average": 0.5, "ranking_sum": 0.5, "gap_sum": 0.0, "gap_per_token": 0.0}),
        off_policy_finding({"far_off_policy": 1.0, "median_excess_nats": 2.0}),
        reward_finding(swapped, "rm"),
        reward_finding(some_noise, "rm"),
        duplicates_finding(duplicate_figures(*np.zeros((3, 2), dtype=np.int64), ["a:1", "a:2"]), 1),
    ]
    tried = 0
    for finding in suggested:
        assert finding.fires, finding.name
        for alternative in re.split(r", or |; ", finding.setting):  # each alternative applies alone
            found = re.findall(r"\b((?:objective|data)\.[a-z_]+)=([\w.]+)", alternative)
            if found:
                config = load_config(overrides=[f"{key}={value}" for key, value in found], command="train")
                build_objective(config.objective)  # its parameters are read by its objective
                tried += 1
    assert tried == 7


def test_a_configs_data_eval_path_is_the_held_out_set_check_data_compares(tmp_path, capsys):
    records, _ = SentimentTask().bradley_terry_pairs(20, seed=1)
    data, held = write(tmp_path / "d.jsonl", records), write(tmp_path / "h.jsonl", records[:2])
    assert main(["check-data", data, "--set", f"data.eval_path={held}"]) == 0
    assert f" ! held-out leakage: 2 of 2 pairs of {held} are training pairs" in capsys.readouterr().out
