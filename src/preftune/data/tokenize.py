"""Token ids exactly as TRL 1.x makes them, the data rules that need a tokenizer, and the
truncation policy.

:class:`Encoder` is the one place prompts and completions become ids, for pairs, unpaired (KTO)
examples, SFT records and the prompts of the sampling commands, so each rule applies to all of
them: double BOS (``data.double_bos``), the chat-template checks (``data.template_mismatch``,
``data.missing_eos``, text the template drops or adds), the assistant mask of templates that mark
it, and template errors as data errors naming ``file:line``.

Chunks of records are tokenized in batches: :meth:`Encoder.prefetch` hands the fast tokenizer every
text a chunk will need in one call (its Rust side encodes each text exactly as a call of its own
would, without the per-call Python overhead), and the per-record logic then finds each text's ids
ready; a text it did not foresee is tokenized on its own, so the ids never depend on the batching.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from . import window
from .records import Message, PreferenceExample, Text
from .report import DataReport, Findings, shown
from .scan import LimitedWarning, TokenizerProblem
from .template import ChatTemplate, answer_findings, common_text_length
from .window import long_text, longest

AS_RENDERED = "trained as rendered"
"""The setting column of the rules that only inform (the template's own choices)."""


@dataclass
class TokenizedPair:
    """Token ids of one pair; ``index`` is its position in the dataset (stable across runs)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    where: str = ""
    margin: float = 0.0


def check_tokenizer(tokenizer: Any, conversational: bool, where: str) -> None:
    if tokenizer.eos_token is None:
        raise TokenizerProblem(
            "tokenizer has no eos_token: completions must end with one; set model.eos_token in the config"
        )
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise TokenizerProblem(
            f"{where}: conversational records need a chat template, and the tokenizer has none; "
            "set data.chat_template to a Jinja template (or a file holding one)"
        )


class OverlongPromptWarning(LimitedWarning):
    """A prompt that fills ``data.max_length``: the first three are named, the rest counted."""

    limit = 3


GENERIC = (
    "transformers.tokenization_utils_base",
    "transformers.tokenization_utils_tokenizers",
    "transformers.tokenization_utils_fast",
)
"""transformers' own modules: a tokenizer whose calling methods all come from them encodes a
batch with the Rust tokenizer's ``encode_batch`` and nothing else."""


def batch_ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Ids of ``texts``, each as ``tokenizer(text, add_special_tokens=special)`` gives them.

    A plain fast tokenizer's Rust side is called directly with ``encode_batch_fast`` (the same
    ids, without the character offsets transformers computes and drops: about 40% less time).
    The first text goes through transformers, which sets the Rust side's truncation, padding and
    special-token handling as it does for every call, and checks that the direct call agrees."""
    backend = getattr(tokenizer, "_tokenizer", None)
    direct = getattr(backend, "encode_batch_fast", None)
    methods = [
        getattr(type(tokenizer), name, None) for name in ("__call__", "_encode_plus", "_batch_encode_plus")
    ]
    plain = all(m is None or getattr(m, "__module__", "") in GENERIC for m in methods)
    first = tokenizer(texts[:1], add_special_tokens=special)["input_ids"]
    if direct is None or not plain or len(texts) == 1:
        return first + tokenizer(texts[1:], add_special_tokens=special)["input_ids"] if texts[1:] else first
    encoded = direct(texts, add_special_tokens=special)
    if encoded[0].ids != list(first[0]):
        return first + tokenizer(texts[1:], add_special_tokens=special)["input_ids"]
    return [first[0]] + [e.ids for e in encoded[1:]]


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading ids the two lists share: slices compared at C speed, the first
    difference found by halving (sharing a prefix of k ids implies sharing every shorter one)."""
    n = min(len(ids), len(other))
    if other[:n] == ids[:n]:
        return n
    shared, differs = 0, n
    while differs - shared > 1:
        middle = (shared + differs) // 2
        if other[:middle] == ids[:middle]:
            shared = middle
        else:
            differs = middle
    return shared


def with_eos(tokenizer: Any, completion: str) -> str:
    """A text completion ends with the EOS text, appended when missing (as TRL does)."""
    eos = tokenizer.eos_token
    return completion if completion.endswith(eos) else completion + eos


def sequence_ids(
    tokenizer: Any, prompt: Text, completion: Text, template_kwargs: dict[str, Any] | None = None
) -> list[int]:
    """Token ids of ``prompt + completion`` exactly as training sees them: text with the EOS text
    appended, tokenized as one string; messages through the chat template. Reward models are
    trained and scored on these, so the EOS convention is the same at both times."""
    if isinstance(completion, list):
        assert isinstance(prompt, list)
        out = tokenizer.apply_chat_template(
            prompt + completion, tokenize=True, return_dict=True, **(template_kwargs or {})
        )
        return list(out["input_ids"])
    return list(tokenizer(str(prompt) + with_eos(tokenizer, completion))["input_ids"])


def sequence_end(tokenizer: Any, prompt: Text, completion: Text, max_length: int | None) -> list[int]:
    """The last ``max_length`` ids of :func:`sequence_ids` (all of them with no limit), where a
    reward model reads its score; from windows of each text's end when one is too long to
    tokenize whole (:mod:`.window`)."""
    limit = long_text(max_length)
    size = longest([prompt, completion])
    if max_length is None or limit is None or size <= limit:
        ids = sequence_ids(tokenizer, prompt, completion)
        return ids[-max_length:] if max_length else ids
    length = max_length  # a name the closure's type checker sees as an int

    def alone(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def run(chars: int) -> window.Trial:
        ids = sequence_ids(
            tokenizer, window.cut_text(prompt, chars, "tail"), window.cut_text(completion, chars, "tail")
        )
        # The kept tokens start after the last cut string's window does.
        last = window.tokens_at_cut(alone, completion, chars, "tail")
        if last is None:
            last = window.tokens_at_cut(alone, prompt, chars, "tail")
        return window.Trial(ids, ids[-length:], last is None or last > length, Findings())

    trial = window.settle(run, size, window.first_window(length))
    kept: list[int] = trial.kept
    return kept


class Encoder:
    """Prompts and completions -> token ids, each data rule applied and its findings noted."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, findings: Findings):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.findings = findings
        self._chat: ChatTemplate | None = None
        self._checked: set[bool] = set()
        self._ready: dict[tuple[str, bool], list[int]] = {}

    def prefetch(self, texts: list[str], special: bool = True) -> None:
        """Tokenize ``texts`` in one call, for :meth:`encode` to find (``special``: with the
        tokenizer's special tokens)."""
        # A text so long that only windows of it are tokenized (:mod:`.window`) is left out.
        limit = long_text(self.cfg.max_length)
        todo = list(
            dict.fromkeys(
                t for t in texts if (t, special) not in self._ready and (limit is None or len(t) <= limit)
            )
        )
        if todo:
            ids = batch_ids(self.tokenizer, todo, special)
            self._ready.update(((text, special), list(i)) for text, i in zip(todo, ids, strict=True))

    def forget(self) -> None:
        """Drop the prefetched ids (a chunk is done)."""
        self._ready.clear()

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Ids of ``text``: prefetched, or tokenized now."""
        ready = self._ready.get((text, special))
        if ready is not None:
            return list(ready)
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def texts(self, prompt: Text, completions: list[Text]) -> list[str]:
        """The texts (with special tokens) :meth:`completions` tokenizes for a text prompt."""
        if not isinstance(prompt, str) or self.tokenizer.eos_token is None:
            return []
        return [prompt] + [prompt + with_eos(self.tokenizer, str(c)) for c in completions]

    def check(self, conversational: bool, where: str) -> None:
        """A tokenizer that cannot serve this kind of record stops the scan at once."""
        if conversational not in self._checked:
            check_tokenizer(self.tokenizer, conversational, where)
            self._checked.add(conversational)

    @property
    def chat(self) -> ChatTemplate:
        if self._chat is None:
            self._chat = ChatTemplate(self.tokenizer, lambda text: self.encode(text, special=False))
        return self._chat

    # ------------------------------------------------------------------ text

    def text_ids(self, text: str, where: str, field: str) -> list[int]:
        """Ids of text with the tokenizer's special tokens; text that already starts with the BOS
        the tokenizer adds (chat data rendered to text) follows ``data.double_bos``."""
        ids = self.encode(text)
        bos = self.tokenizer.bos_token_id
        if bos is None or ids[:2] != [bos, bos]:
            return ids
        policy = self.cfg.double_bos
        self.findings.note(
            "double_bos", f"data.double_bos={policy}", where, f"{shown(text[:40])} starts with the BOS text"
        )
        if policy == "error":
            raise DataError(
                f"{where}: field '{field}' starts with {self.tokenizer.bos_token!r}, and the tokenizer adds "
                "another (data.double_bos=error; strip or warn to go on)"
            )
        return ids[1:] if policy == "strip" else ids

    # ------------------------------------------------------------------ prompts and completions

    def prompt_ids(self, prompt: Text, kwargs: dict[str, Any], where: str, field: str) -> list[int]:
        """A prompt as the policy reads it before generating (the chat template's generation prompt)."""
        self.check(isinstance(prompt, list), where)
        if isinstance(prompt, str):
            return self.text_ids(prompt, where, field)
        return self.chat.ids(self.chat.render(prompt, kwargs, where, generation=True))

    def completions(
        self,
        prompt: Text,
        completions: list[Text],
        kwargs: dict[str, Any],
        where: str,
        fields: tuple[str, ...],
    ) -> tuple[list[int], list[list[int]]]:
        """``(prompt_ids, [completion_ids])`` as TRL 1.x makes them: the completion starts where the
        prompt's ids and each ``prompt + completion`` stop agreeing (tokens can merge across the
        boundary), the earliest for all completions of one prompt."""
        self.check(isinstance(prompt, list), where)
        if isinstance(prompt, str):
            prompt_ids = self.text_ids(prompt, where, self.cfg.prompt_field)
            fulls = [
                self.text_ids(prompt + with_eos(self.tokenizer, str(c)), where, self.cfg.prompt_field)
                for c in completions
            ]
            cut = min(common_prefix_length(prompt_ids, full) for full in fulls)
            return prompt_ids[:cut], [full[cut:] for full in fulls]
        return self._conversation(
            prompt, [c for c in completions if isinstance(c, list)], kwargs, where, fields
        )

    def _conversation(
        self,
        prompt: list[Message],
        completions: list[list[Message]],
        kwargs: dict[str, Any],
        where: str,
        fields: tuple[str, ...],
    ) -> tuple[list[int], list[list[int]]]:
        chat = self.chat
        prompt_text = chat.render(prompt, kwargs, where, generation=True)
        prompt_ids = chat.ids(prompt_text)
        texts = [chat.render(prompt + c, kwargs, where) for c in completions]
        cuts, fulls = [], []
        turn = sum(m["role"] == "assistant" for m in prompt)
        for text, completion in zip(texts, completions, strict=True):
            # The template's own assistant mask, where it marks one, is the exact boundary.
            ids, _, start = (
                chat.masked(prompt + completion, kwargs, where, turn)
                if chat.masks
                else (chat.ids(text), [], None)
            )
            fulls.append(ids)
            cuts.append(start if start is not None else common_prefix_length(prompt_ids, ids))
        cut = min(cuts)
        kept_prompt, outs = fulls[0][:cut], [full[cut:] for full in fulls]
        if self._mismatch(prompt_text, texts, where) and self.cfg.template_mismatch == "prompt":
            # Training sees the prompt inference will: the generation prompt as rendered, then
            # each completion's own tokens.
            kept_prompt, outs = prompt_ids, [full[c:] for full, c in zip(fulls, cuts, strict=True)]
        for i, (text, completion) in enumerate(zip(texts, completions, strict=True)):
            completion_text = text[common_text_length(prompt_text, text) :]
            self._answer(prompt_text, completion_text, completion, where)
            outs[i] = self._stop(outs[i], completion_text, where, fields[i])
        return kept_prompt, outs

    def _mismatch(self, prompt_text: str, texts: list[str], where: str) -> bool:
        """The prompt rendered alone must start every rendered conversation; say what it loses."""
        other = next((text for text in texts if not text.startswith(prompt_text)), None)
        if other is None:
            return False
        dropped = prompt_text[common_text_length(prompt_text, other) :]
        policy = self.cfg.template_mismatch
        evidence = f"{shown(dropped)} ends the prompt rendered alone, not the conversation"
        self.findings.note("template_mismatch", f"data.template_mismatch={policy}", where, evidence)
        if policy == "error":
            raise DataError(
                f"{where}: the chat template ends the prompt rendered alone with {shown(dropped)}, which the "
                "whole conversation does not have (data.template_mismatch=error; warn or prompt to go on)"
            )
        return True

    def _answer(self, prompt_text: str, completion_text: str, completion: list[Message], where: str) -> None:
        for rule, evidence in answer_findings(prompt_text, completion_text, completion):
            self.findings.note(rule, AS_RENDERED, where, evidence)

    def _stop(self, ids: list[int], completion_text: str, where: str, field: str) -> list[int]:
        """A rendered completion must end in EOS or an end-of-turn token (``data.missing_eos``)."""
        if not ids or self.chat.ends_in_stop(ids):
            return ids
        policy = self.cfg.missing_eos
        tail = shown(completion_text[-30:])
        self.findings.note("missing_eos", f"data.missing_eos={policy}", where, f"ends {tail}")
        if policy == "error":
            raise DataError(
                f"{where}: field '{field}' renders to a completion that ends with no EOS or end-of-turn token "
                f"({tail}) (data.missing_eos=error; append or warn to go on)"
            )
        return [*ids, self.tokenizer.eos_token_id] if policy == "append" else ids

    # ------------------------------------------------------------------ whole conversations (SFT)

    def conversation(
        self, messages: list[Message], kwargs: dict[str, Any], where: str, field: str
    ) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and 1 on its assistant turns: the template's mask where it
        marks one, else each turn from where the conversation up to it (with the generation prompt)
        stops matching to where the conversation including it does (any template works). The final
        assistant turn gets the completion checks."""
        self.check(True, where)
        chat = self.chat
        text = chat.render(messages, kwargs, where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if chat.masks:
            ids, mask, _ = chat.masked(messages, kwargs, where, 0)
        else:
            ids = chat.ids(text)
            mask = [0] * len(ids)
        prompt_text = ""
        for i in turns:
            if i == 0 or (chat.masks and i != turns[-1]):
                continue
            prompt_text = chat.render(messages[:i], kwargs, where, generation=True)
            if not chat.masks:
                start = common_prefix_length(chat.ids(prompt_text), ids)
                end = common_prefix_length(chat.ids(chat.render(messages[: i + 1], kwargs, where)), ids)
                mask[start:end] = [1] * (end - start)
        if turns and turns[-1] == len(messages) - 1 and prompt_text:
            self._mismatch(prompt_text, [text], where)
            completion_text = text[common_text_length(prompt_text, text) :]
            self._answer(prompt_text, completion_text, messages[-1:], where)
            stopped = self._stop(ids, completion_text, where, field)
            mask += [1] * (len(stopped) - len(ids))
            ids = stopped
        return ids, mask


def tokenize_example(tokenizer: Any, example: PreferenceExample) -> tuple[list[int], list[int], list[int]]:
    """Token ids ``(prompt, chosen, rejected)`` exactly as TRL 1.x's DPOTrainer makes them."""
    encoder = Encoder(tokenizer, DataConfig(), Findings())
    prompt_ids, (chosen_ids, rejected_ids) = encoder.completions(
        example.prompt,
        [example.chosen, example.rejected],
        example.template_kwargs,
        example.where,
        example.fields,
    )
    return prompt_ids, chosen_ids, rejected_ids


def truncate(
    pair: TokenizedPair, cfg: DataConfig, report: DataReport, windowed: bool = False
) -> TokenizedPair | None:
    """Apply the truncation policy; ``None`` means the pair is dropped.

    1. A prompt over ``max_prompt_length`` keeps its *end* (the part next to the answer).
    2. A prompt that alone fills ``max_length`` leaves no completion token: drop or error
       (``data.overlong_prompt``), as TRL drops it.
    3. ``prompt + completion`` over ``max_length`` keeps its *start* (TRL's ``keep_start``).
    """
    prompt = pair.prompt_ids
    if cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length:
        prompt = prompt[len(prompt) - cfg.max_prompt_length :]
        report.prompt_truncated += 1
    if cfg.max_length is None:
        return TokenizedPair(prompt, pair.chosen_ids, pair.rejected_ids, pair.index, pair.where, pair.margin)
    if len(prompt) >= cfg.max_length:
        overlong(len(prompt), pair.where, cfg, report, "pair", windowed)
        return None
    room = cfg.max_length - len(prompt)
    chosen, rejected = pair.chosen_ids, pair.rejected_ids
    if len(chosen) > room or len(rejected) > room:
        chosen, rejected = chosen[:room], rejected[:room]
        report.completion_truncated += 1
    return TokenizedPair(prompt, chosen, rejected, pair.index, pair.where, pair.margin)


def overlong(
    length: int, where: str, cfg: DataConfig, report: DataReport, item: str, windowed: bool = False
) -> None:
    """A prompt that fills ``max_length`` alone: stop (``data.overlong_prompt=error``), or count it,
    warn for the first three and let the caller drop the ``item``. ``windowed``: ``length`` counts
    the part of a very long prompt that was tokenized (:mod:`.window`)."""
    message = (
        f"{where}: field '{cfg.prompt_field}' is {'over ' * windowed}{length} tokens, which fills "
        f"data.max_length={cfg.max_length} and leaves no room for the completion"
    )
    report.findings.note(
        "overlong_prompt", f"data.overlong_prompt={cfg.overlong_prompt}", where, f"{length} tokens"
    )
    if cfg.overlong_prompt == "error":
        raise DataError(message + f" (set data.overlong_prompt=drop to skip such {item}s)")
    if report.dropped_overlong_prompt < OverlongPromptWarning.limit:
        warnings.warn(message + f"; {item} dropped", OverlongPromptWarning, stacklevel=3)
    report.dropped_overlong_prompt += 1
