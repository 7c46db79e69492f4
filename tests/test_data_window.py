"""A text far longer than data.max_length is tokenized only as far as truncation keeps it, and the
kept ids are those of the whole text, for every tokenizer family and every kind of record."""

from __future__ import annotations

import functools
import random

import pytest
from real_chat import real_tokenizer, trl_template
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from preftune.config import DataConfig
from preftune.data import DataError, prepare_pairs, prepare_unpaired, window
from preftune.data.prompts import read_prompts
from preftune.data.report import Findings
from preftune.data.sft import prepare_sft
from preftune.data.tokenize import sequence_end
from preftune.experiments.synthetic import build_tokenizer

WORDS = [
    "the",
    "kind",
    "review",
    "of",
    "a",
    "film",
    "was",
    "lovely",
    "awful",
    "good",
    "bad",
    "and",
    "it",
    "12",
    "345",
    "café",
    "naïve",
    "ü",
]


def prose(n_words: int, seed: int) -> str:
    """Words, punctuation, newlines, runs of one character, CJK and a very long word."""
    rng = random.Random(seed)
    pieces = []
    for i in range(n_words):
        pieces.append(rng.choice(WORDS))
        if i % 97 == 5:
            pieces.append("=" * rng.randint(3, 40))
        if i % 131 == 7:
            pieces.append("\n\n" + "好的" * rng.randint(1, 9))
        if i % 501 == 9:
            pieces.append("x" * rng.randint(100, 300))
        if i % 13 == 0:
            pieces.append(rng.choice([",", ".", "!", "?\n"]))
    return " ".join(pieces)


CORPUS = [prose(400, seed) for seed in range(6)]


def _fast(tok: Tokenizer, **roles: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


@functools.cache
def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """Llama-2's shape: no pre-tokenizer (the whole text is one word), ``▁`` for spaces, byte fallback."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    tok.train_from_iterator([t.replace(" ", "▁") for t in CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@functools.cache
def wordpiece() -> PreTrainedTokenizerFast:
    """BERT's shape: words split on spaces and punctuation, a word over 100 characters is [UNK]."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A [SEP] $B", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return _fast(tok, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]")


@functools.cache
def unigram() -> PreTrainedTokenizerFast:
    """T5's shape: a Unigram model over Metaspace words."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return _fast(tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@functools.cache
def byte_level() -> PreTrainedTokenizerFast:
    return build_tokenizer()


FAMILIES = {
    "byte_level_bpe": byte_level,
    "sentencepiece_bpe": sentencepiece_bpe,
    "wordpiece": wordpiece,
    "unigram": unigram,
}


@pytest.fixture
def whole(monkeypatch):
    """A function that runs its argument with windows turned off: every text tokenized whole."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(window, "long_text", lambda max_length: None)
            m.setattr("preftune.data.tokenize.long_text", lambda max_length: None)
            return fn(*args, **kwargs)

    return run


def pairs_kept(source, tokenizer, cfg):
    rows, report = prepare_pairs(source, tokenizer, cfg, progress=False)
    return [(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in rows], report


def long_records(seed: int) -> list[dict]:
    huge = prose(12_000, seed)  # ~75k characters: past the window limit at max_length=64
    short = prose(30, seed + 1)
    return [
        {"prompt": "review of the film:", "chosen": " " + huge, "rejected": " " + short},
        {"prompt": "review of the film:", "chosen": " " + short, "rejected": " " + huge[::-1]},
        {"prompt": huge + "\nreview:", "chosen": " good", "rejected": " bad"},
        {"prompt": "review:", "chosen": " " + short, "rejected": " " + prose(20, seed + 2)},
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_prompt_length", [None, 24])
def test_a_long_text_keeps_the_ids_of_the_whole_text_in_every_tokenizer_family(
    family, max_prompt_length, whole
):
    tokenizer = FAMILIES[family]()
    cfg = DataConfig(max_length=64, max_prompt_length=max_prompt_length)
    records = long_records(seed=3)
    windowed, report = pairs_kept(records, tokenizer, cfg)
    expected, whole_report = whole(pairs_kept, records, tokenizer, cfg)
    assert windowed == expected
    assert report.windowed == 3 and whole_report.windowed == 0
    assert (
        report.kept,
        report.completion_truncated,
        report.prompt_truncated,
        report.dropped_overlong_prompt,
    ) == (
        whole_report.kept,
        whole_report.completion_truncated,
        whole_report.prompt_truncated,
        whole_report.dropped_overlong_prompt,
    )


def test_a_word_the_tokenizer_makes_one_token_of_is_read_to_its_end():
    """WordPiece makes one [UNK] of any word over 100 characters: a window of it holds fewer
    tokens than training keeps, so the window grows to the whole text, and the word after it counts."""
    tokenizer = wordpiece()
    cfg = DataConfig(max_length=64)
    answer = " " + "x" * 80_000 + " good bad"
    rows, report = pairs_kept([{"prompt": "review:", "chosen": answer, "rejected": " bad"}], tokenizer, cfg)
    good, bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
    assert rows[0][1][-3:-1] == [good, bad]
    assert report.windowed == 0  # read whole in the end


class Watched:
    """A tokenizer that notes the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, [0]

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kwargs):
        self.seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return self.tokenizer(text, **kwargs)


HUGE = " " + prose(200_000, seed=1)  # ~1.2 MB


@pytest.mark.parametrize(
    ("prepare", "record"),
    [
        (prepare_pairs, {"prompt": "review:", "chosen": HUGE, "rejected": " bad"}),
        (prepare_pairs, {"prompt": HUGE, "chosen": " good", "rejected": " bad"}),
        (prepare_unpaired, {"prompt": "review:", "completion": HUGE, "label": True}),
        (prepare_sft, {"text": HUGE}),
        (prepare_sft, {"prompt": "review:", "completion": HUGE}),
    ],
    ids=["pair-answer", "pair-prompt", "kto", "sft-text", "sft-prompt-completion"],
)
def test_a_huge_text_is_never_tokenized_whole(prepare, record):
    """Neither the chunk's batched prefetch nor the record's own tokenization sees the whole text."""
    watched = Watched(byte_level())
    _, report = prepare([record], watched, DataConfig(max_length=64, max_prompt_length=24), progress=False)
    assert len(HUGE) > 1_000_000 and report.windowed == 1
    assert max(watched.seen) <= 2 * window.first_window(64) + 100


@pytest.mark.parametrize(
    ("name", "training"), [("qwen3", None), ("r1_distill_new", None), ("qwen2_5", "qwen2_5_training")]
)
def test_a_conversation_is_tokenized_whole_because_its_template_may_read_a_whole_message(name, training):
    """Qwen3 and DeepSeek-R1 split an answer at ``</think>``: a window of a long reasoning answer
    would lose it and render differently. Conversations are never cut."""
    tokenizer = real_tokenizer(name, trl_template(training) if training else None)
    reasoning = "<think>\n" + prose(12_000, seed=5) + "\n</think>\n\nGood."
    user = {"role": "user", "content": "Review the film."}
    records = [
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": reasoning}],
            "rejected": [{"role": "assistant", "content": "Bad."}],
        }
    ]
    _, report = pairs_kept(records, tokenizer, DataConfig(max_length=96))
    assert report.windowed == 0


def test_kto_examples_keep_the_ids_of_the_whole_text(whole):
    tokenizer = byte_level()
    cfg = DataConfig(max_length=64)
    records = long_records(seed=7)

    def kept(*args):
        rows, report = prepare_unpaired(*args, progress=False)
        room = [64 - len(r.prompt_ids) for r in rows]
        return [(r.prompt_ids, r.completion_ids[:n]) for r, n in zip(rows, room, strict=True)], report

    windowed, report = kept(records, tokenizer, cfg)
    expected, _ = whole(kept, records, tokenizer, cfg)
    assert windowed == expected and report.windowed == 4  # the long prompt's record gives two examples


@pytest.mark.parametrize("form", ["text", "prompt_completion", "messages"])
def test_sft_records_keep_the_ids_of_the_whole_text(form, whole):
    tokenizer = real_tokenizer("qwen2_5") if form == "messages" else byte_level()
    cfg = DataConfig(max_length=80)
    huge = prose(13_000, seed=11)
    records = {
        "text": [{"text": huge}, {"text": "short one"}],
        "prompt_completion": [
            {"prompt": "review:", "completion": " " + huge},
            {"prompt": huge, "completion": " good"},
        ],
        "messages": [
            {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": huge}]},
            {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "Hello."}]},
        ],
    }[form]

    def kept(*args):
        rows, report = prepare_sft(*args, progress=False)
        return [(r.input_ids, r.loss_mask) for r in rows], report

    windowed, report = kept(records, tokenizer, cfg)
    expected, _ = whole(kept, records, tokenizer, cfg)
    assert windowed == expected
    assert report.windowed == {"text": 1, "prompt_completion": 2, "messages": 0}[form]  # messages: whole
    assert ("long texts: " in report.summary()) == (form != "messages")


@pytest.mark.parametrize("max_prompt_length", [None, 30])
def test_sampling_prompts_keep_the_ids_of_the_whole_prompt(max_prompt_length, whole):
    tokenizer = real_tokenizer("qwen2_5")
    cfg = DataConfig(max_length=64, max_prompt_length=max_prompt_length)
    records = [
        {"prompt": prose(12_000, seed=13) + " end"},
        {"prompt": [{"role": "user", "content": prose(12_000, 14)}]},
    ]
    ids = [p.ids for p in read_prompts(records, cfg, "train", tokenizer)]
    expected = [p.ids for p in whole(read_prompts, records, cfg, "train", tokenizer)]
    if max_prompt_length is None:  # both fill max_length: unusable either way
        assert all(len(x) >= 64 for x in ids + expected)
    else:
        assert ids == expected


@pytest.mark.parametrize("family", ["byte_level_bpe", "wordpiece"])
def test_a_reward_model_reads_the_end_of_the_whole_sequence(family, whole):
    tokenizer = FAMILIES[family]()
    prompt, answer = prose(12_000, seed=17), " " + prose(12_000, seed=18) + " the end"
    for p, a in [(prompt, " good"), ("review:", answer), (prompt, answer)]:
        assert sequence_end(tokenizer, p, a, 64) == whole(sequence_end, tokenizer, p, a, 64)


def test_a_prompt_that_fills_max_length_is_dropped_naming_a_lower_bound():
    cfg = DataConfig(max_length=64)
    records = [
        {"prompt": prose(12_000, seed=19), "chosen": " good", "rejected": " bad"},
        *long_records(2)[3:],
    ]
    with pytest.warns(UserWarning, match=r"line 1|row 0|field 'prompt' is over \d+ tokens"):
        rows, report = prepare_pairs(records, byte_level(), cfg, progress=False)
    assert report.dropped_overlong_prompt == 1 and len(rows) == 1


def test_two_answers_that_start_alike_are_not_called_identical():
    """Windows of two long answers that differ only far past max_length give equal ids; the pair
    is no identical pair (its texts differ) and trains as truncation leaves it, as in TRL."""
    common = " " + prose(12_000, seed=23)
    records = [{"prompt": "review:", "chosen": common + " good", "rejected": common + " bad"}]
    rows, report = prepare_pairs(records, byte_level(), DataConfig(max_length=64), progress=False)
    assert report.identical == 0 and len(rows) == 1


def trial_at(chars: int, changes_below: int, settled_from: int = 0) -> window.Trial:
    """A record whose kept ids change until the window reaches ``changes_below`` characters."""
    kept = min(chars, changes_below)
    return window.Trial(result=chars, kept=kept, settled=chars >= settled_from, findings=Findings())


def test_a_window_whose_kept_ids_change_when_doubled_grows_again():
    tried: list[int] = []

    def run(chars):
        tried.append(chars)
        return trial_at(chars, changes_below=5000)

    trial = window.settle(run, longest_text=100_000, chars=1024)
    assert tried == [1024, 2048, 4096, 8192, 16384] and trial.result == 16384


def test_a_window_cut_inside_the_kept_tokens_grows_even_when_doubling_changes_nothing():
    assert window.settle(lambda c: trial_at(c, 0, settled_from=8192), 100_000, 1024).result == 16384


def test_a_window_that_never_settles_ends_as_the_whole_text():
    assert window.settle(lambda c: trial_at(c, 10**9), 100_000, 1024).result == 131072  # past the end: whole


@pytest.mark.slow  # writes a 50 MB file and trains a step in a subprocess (~30 s)
def test_a_50_mb_line_trains_in_bounded_memory(tmp_path):
    import json
    import subprocess
    import sys

    from preftune.experiments.synthetic import tiny_llama

    model = tmp_path / "model"
    tokenizer = byte_level()
    tiny_llama(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = tmp_path / "huge.jsonl"
    short = {"prompt": "review of the book:", "chosen": " kind", "rejected": " cruel"}
    huge = {**short, "chosen": " kind" * 10_000_000}
    data.write_text("".join(json.dumps(r) + "\n" for r in [huge, short, short]))
    assert data.stat().st_size > 50_000_000
    command = [sys.executable, "-m", "preftune", "train", "--model", str(model), "--data", str(data)]
    command += [
        "--output",
        str(tmp_path / "run"),
        "--set",
        "train.max_steps=1",
        "--set",
        "data.max_length=64",
    ]
    # A fresh interpreter measures its one child: this process's children include earlier tests'.
    measure = (
        "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(done.stdout)"
    )
    out = subprocess.run(
        [sys.executable, "-c", measure, *command], capture_output=True, text=True, check=True
    ).stdout
    code, peak_kib = map(int, out.split("\n", 1)[0].split())
    assert code == 0, out
    assert "long texts: 1 pair holds a text too long to tokenize whole" in out
    assert (tmp_path / "run" / "final").is_dir()
    assert peak_kib < 1_500_000  # 5.5 GB when the line was tokenized whole; ~0.55 GB now


# --------------------------------------------------------------------------- cases a window gets wrong


@pytest.mark.parametrize(
    ("family", "record"),
    [
        ("sentencepiece_bpe", {"prompt": "review " + "=" * 5001, "chosen": " good", "rejected": " bad"}),
        ("unigram", {"prompt": "review:", "chosen": " " + "x" * 5001 + " good", "rejected": " bad"}),
        ("byte_level_bpe", {"prompt": "x" + "\n" * 5002 + " q:", "chosen": " good", "rejected": " bad"}),
        ("sentencepiece_bpe", {"prompt": "review:", "chosen": " good " + "=" * 9000, "rejected": " bad"}),
    ],
)
def test_a_run_of_one_character_is_never_cut_inside(family, record, whole):
    """How BPE and Unigram split a run depends on the run's length: a cut inside one changes the
    tokens next to it, and two windows cut inside it can agree with each other but not with the
    whole text. Cuts fall only at a single space between two other characters."""
    tokenizer = FAMILIES[family]()
    cfg = DataConfig(max_length=64, max_prompt_length=24)
    assert pairs_kept([record], tokenizer, cfg)[0] == whole(pairs_kept, [record], tokenizer, cfg)[0]


def test_a_reward_model_reads_the_end_of_a_run_as_the_whole_text_gives_it(whole):
    tokenizer = byte_level()
    assert sequence_end(tokenizer, "review:", "a" + "0" * 5001, 64) == whole(
        sequence_end, tokenizer, "review:", "a" + "0" * 5001, 64
    )


def test_cuts_fall_at_a_single_space_between_two_other_characters():
    text = "aaaa bbbb  cccc====dddd eeee"
    assert window.cut(text, 12, "head") == "aaaa"  # not at a double space, not inside a word
    assert window.cut(text, 12, "tail") == " eeee"  # "====dddd" is no safe start
    assert window.cut("=" * 100, 10, "head") == "=" * 100  # no safe point: not cut
    assert window.cut("aaaa bbbb", 5, "tail") == " bbbb"  # a safe point just at the window's start


def test_a_long_prompt_does_not_hide_answers_the_tokenizer_makes_identical():
    """WordPiece lowercases: " Good" and " good" are the same ids. The answers are whole, so the
    identical-pair rule applies as without windows."""
    record = {"prompt": prose(12_000, seed=29) + " review:", "chosen": " Good", "rejected": " good"}
    with pytest.raises(DataError, match="give identical token ids"):
        prepare_pairs(
            [record],
            wordpiece(),
            DataConfig(max_length=64, max_prompt_length=24, identical_pairs="error"),
            progress=False,
        )


def test_a_long_prompt_starting_with_the_bos_text_is_still_a_double_bos():
    record = {"prompt": "<s>" + prose(12_000, seed=31), "chosen": " good", "rejected": " bad"}
    cfg = DataConfig(max_length=64, max_prompt_length=24, double_bos="error")
    with pytest.raises(DataError, match="starts with '<s>'"):
        prepare_pairs([record], byte_level(), cfg, progress=False)
    with pytest.raises(DataError, match="starts with '<s>'"):
        read_prompts([{"prompt": record["prompt"]}], cfg, "train", byte_level())


def test_hh_rlhf_records_with_long_turns_keep_the_ids_of_the_whole_text(whole):
    """HH-RLHF's shape (implicit prompts, ``\\n\\nHuman:``/``\\n\\nAssistant:`` turns), its records
    made long: a long last answer, and a long first human turn (the prompt is cut at its start)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).parent / "fixtures/datasets/hh_rlhf.jsonl").open()]
    records = [
        {k: r[k] + " " + prose(15_000, seed=i) for k in ("chosen", "rejected")}
        for i, r in enumerate(rows[:3])
    ]
    opening = "\n\nHuman: " + prose(15_000, seed=7)
    records.append({k: opening + rows[3][k] for k in ("chosen", "rejected")})
    tokenizer = real_tokenizer("llama3_1")
    cfg = DataConfig(max_length=128, max_prompt_length=64)
    windowed, report = pairs_kept(records, tokenizer, cfg)
    assert windowed == whole(pairs_kept, records, tokenizer, cfg)[0] and report.windowed == report.kept >= 3
