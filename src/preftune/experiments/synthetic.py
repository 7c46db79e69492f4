"""Tiny models, tokenizers and a task with a known true reward, all built locally.

Used by the demo and the tests: no hub, no network. The tokenizer is a real
``PreTrainedTokenizerFast`` (BPE trained here with ``tokenizers``, a BOS post-processor
and a chat template), and the models are real ``transformers`` Llama models with
random initialisation, so every code path is the one users run on hub checkpoints.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# The demo's words: the true reward counts positive minus negative words.
POSITIVE = ["great", "calm", "bright", "kind", "warm", "clear", "brave", "fresh", "gentle", "lively"]
NEGATIVE = ["awful", "dull", "harsh", "cold", "murky", "rude", "stale", "bleak", "noisy", "sour"]
TOPICS = [
    "park",
    "movie",
    "book",
    "song",
    "meal",
    "trip",
    "city",
    "game",
    "class",
    "party",
    "river",
    "garden",
]

_BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what colour is the sky? Answer: it is blue.",
    "Hello there, how are you today? I am fine, thank you.",
    "Preference optimization aligns language models with human judgement.",
    "Numbers like 12, 345 and 6789 appear in text too.",
]


def task_corpus() -> list[str]:
    words = " ".join(POSITIVE + NEGATIVE)
    return [*_BASE_CORPUS, words, *(f"review of the {t}: {words}" for t in TOPICS)]


def build_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = 320, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``, adding ``<s>`` in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or task_corpus()) * 4, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(
    vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    max_positions: int = 512,
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough to train on a laptop CPU in seconds."""
    config = tiny_llama_config(vocab_size, hidden_size, layers, heads, max_positions)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model


def tiny_reward_model(
    vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> LlamaForSequenceClassification:
    """The same tiny Llama with a one-output reward head (``score``) instead of the LM head."""
    config = tiny_llama_config(vocab_size, hidden_size, layers, heads)
    config.num_labels = 1
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


# --------------------------------------------------------------------------- the demo task


@dataclass(frozen=True)
class SentimentTask:
    """Prompts ``review of the <topic>:``; a response is a few words; the true reward is
    (#positive − #negative words) / #words, so success is measured, not inferred from a loss."""

    min_words: int = 4
    max_words: int = 7

    @staticmethod
    def prompt(topic: str) -> str:
        return f"review of the {topic}:"

    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self.prompt(rng.choice(TOPICS)) for _ in range(n)]

    def random_response(self, rng: random.Random) -> str:
        words = [rng.choice(POSITIVE + NEGATIVE) for _ in range(rng.randint(self.min_words, self.max_words))]
        return " " + " ".join(words)

    def bradley_terry_pairs(
        self, n: int, seed: int, scale: float = 8.0, topics: list[str] | None = None
    ) -> tuple[list[dict[str, str]], float]:
        """``n`` pairs of random responses whose label is a Bradley–Terry draw on the true reward:
        ``P(a preferred over b) = σ(scale · (r(a) − r(b)))``, so the labels are noisy as human ones are.

        Returns the records and the Bayes accuracy ``mean(max(p, 1 − p))``: the best any reward
        model can score against these labels (knowing the true reward exactly). ``topics``
        restricts the prompts (another list gives a prompt-shifted set).
        """
        rng = random.Random(seed)
        records, best = [], 0.0
        for _ in range(n):
            prompt = self.prompt(rng.choice(topics or TOPICS))
            a, b = self.random_response(rng), self.random_response(rng)
            p = 1 / (1 + math.exp(-scale * (self.true_reward(a) - self.true_reward(b))))
            chosen, rejected = (a, b) if rng.random() < p else (b, a)
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            best += max(p, 1 - p)
        return records, best / n

    @staticmethod
    def true_reward(response: str) -> float:
        words = response.replace("</s>", " ").split()
        if not words:
            return -1.0
        score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        return score / len(words)


def true_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The task's true reward as a reward function (``--reward preftune.experiments.synthetic:true_reward``)."""
    return [SentimentTask.true_reward(completion) for completion in completions]


def write_task(folder: str, seed: int = 0, pairs: int = 2048) -> dict[str, str]:
    """The synthetic task on disk, for examples and pipelines: an untrained tiny base model with
    its tokenizer, SFT records (random reviews), Bradley–Terry-labelled preference pairs, held-out
    pairs on the same topics and on unseen ones (prompt shift). Returns what was written."""
    import json
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=512)
    tiny_llama(len(tokenizer), hidden_size=64, layers=2, heads=4, seed=seed).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    task, rng = SentimentTask(), random.Random(seed)
    seen, unseen = TOPICS[:8], TOPICS[8:]
    files = {
        "sft.jsonl": [
            {"prompt": task.prompt(rng.choice(seen)), "completion": task.random_response(rng)}
            for _ in range(pairs)
        ],
        "prefs.jsonl": task.bradley_terry_pairs(pairs, seed + 1, topics=seen)[0],
        "heldout.jsonl": task.bradley_terry_pairs(256, seed + 2, topics=seen)[0],
        "prompt_shift.jsonl": task.bradley_terry_pairs(256, seed + 3, topics=unseen)[0],
    }
    for name, records in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"base": str(out / "base"), **{name: str(out / name) for name in files}}
