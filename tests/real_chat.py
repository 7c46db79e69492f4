"""Tokenizers with real chat templates, and real-shaped public records, built from
``tests/fixtures`` without a network (the fixtures' README says where each template comes from).

A tokenizer here is a small byte-level BPE trained on the fixture texts, with the model's own
special tokens (each one id), BOS/EOS/pad, the chat template byte for byte, and — where the real
tokenizer adds BOS by itself — a post-processor that adds it, so double BOS shows as it would.
The ids mean nothing; where a rule cuts, what it keeps and what it drops are the real template's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
DATASETS = FIXTURES / "datasets"


@functools.cache
def template(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))


def records(name: str) -> list[dict[str, Any]]:
    lines = (DATASETS / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@functools.cache
def _corpus() -> tuple[str, ...]:
    texts = [path.read_text(encoding="utf-8") for path in sorted(DATASETS.glob("*.jsonl"))]
    for path in sorted(TEMPLATES.glob("*.json")):
        renders = json.loads(path.read_text(encoding="utf-8"))["renders"].values()
        texts += [r["text"] for r in renders if "text" in r]
    return tuple(texts)


def real_tokenizer(name: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A fresh tokenizer for the model ``name`` (a fixture's file name); ``chat_template``
    replaces the model's own (TRL's training variants)."""
    spec = template(name)
    roles = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if spec.get(k)}
    plain = set(spec.get("non_special_added_tokens") or ())
    special = [t for t in dict.fromkeys([*roles.values(), *spec["special_tokens"]]) if t not in plain]
    tok = Tokenizer(models.BPE(unk_token=spec.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if spec.get("add_bos_token") and spec.get("bos_token"):
        bos = spec["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in special if t not in roles.values()]}
    )
    tokenizer.add_tokens(sorted(plain))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template if chat_template is not None else spec["chat_template"]
    return tokenizer


def trl_template(name: str) -> str:
    """One of the chat templates TRL ships (``trl/chat_templates/NAME.jinja``)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
