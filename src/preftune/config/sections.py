"""The config sections every training command shares (``model``, ``data``, ``reference``,
``train``), the reward-model section (``rm``) and the two sections of the commands that sample
(``prompts``, ``reward``), each with the range checks of its values.

Part of the ground floor: it imports nothing of preftune but the errors (through :mod:`.coerce`).
Each field's docstring is its help text (``preftune config``, ``--help``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .coerce import need, suggest

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub name or local folder of an ``AutoModelForCausalLM``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model and tokenizer."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on a GPU that supports it, else float32."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for sources you trust)."""
    attn_implementation: str | None = None
    """e.g. ``sdpa``, ``eager``, ``flash_attention_2``; None lets transformers choose."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, about a third more compute."""
    lora: bool = False
    """Train LoRA adapters instead of all weights (the reference is then the adapters off)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps policy and reference comparable."""
    lora_target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: a list of names, or ``all-linear``."""
    load_in_4bit: bool = False
    """QLoRA: 4-bit NF4 base weights (double quantization, computing in ``dtype``), LoRA on top; the
    reference is the base with adapters off. Needs bitsandbytes (``pip install 'preftune[quant]'``);
    runs on a CPU too. ``final/`` holds the merged weights in ``dtype`` and the adapter in ``adapter/``."""
    eos_token: str | None = None
    """Override the tokenizer's end-of-sequence token (appended to every text completion)."""
    pad_token: str | None = None
    """Padding token; when the tokenizer has none, EOS is used (pad positions are masked anyway)."""


@dataclass
class DataConfig:
    path: str = ""
    """JSONL / JSON / CSV / Parquet file, a hub dataset name (``name:config`` for a configuration), or a
    dataset folder (``save_to_disk``'s, or data files ``load_dataset`` reads)."""
    split: str = "train"
    """Split of a hub dataset to train on: ``train``, a slice (``train[:1%]``, ``train[100:200]``), or
    ``stream:train`` to stream it (``datasets`` streaming: nothing downloaded or prepared ahead)."""
    eval_path: str | None = None
    """Held-out pairs (same formats as ``path``), evaluated every ``train.eval_every`` steps and at the end."""
    eval_split: str = "test"
    """Split of a hub dataset to evaluate on (slices and ``stream:`` as ``split``); set alone, that split
    of ``path``'s dataset."""
    prompt_field: str = "prompt"
    """Field holding the prompt (missing: the shared prefix of chosen and rejected)."""
    chosen_field: str = "chosen"
    """Field holding the preferred completion."""
    rejected_field: str = "rejected"
    """Field holding the dispreferred completion."""
    completion_field: str = "completion"
    """SFT and KTO: field holding the completion of a ``{prompt, completion}`` record."""
    label_field: str = "label"
    """KTO: field saying whether a ``{prompt, completion}`` record is desirable (true) or not (false)."""
    messages_field: str = "messages"
    """SFT: field holding a whole conversation (the loss covers its assistant turns)."""
    text_field: str = "text"
    """SFT: field holding plain text (the loss covers every token)."""
    completion_only_loss: bool = True
    """SFT: loss on completions and assistant turns only; false: on every token."""
    max_length: int | None = 1024
    """Prompt + completion tokens; longer completions keep their start (as TRL)."""
    max_prompt_length: int | None = None
    """Longer prompts keep their end, the part next to the answer."""
    overlong_prompt: Literal["drop", "error"] = "drop"
    """A prompt that fills ``max_length`` on its own: drop the pair (with a warning) or stop."""
    identical_pairs: Literal["warn", "drop", "error"] = "warn"
    """Pairs whose chosen equals rejected (as given, or after the chat template): keep with a warning,
    drop, or stop."""
    empty_completions: Literal["drop", "error", "keep"] = "drop"
    """An empty completion (HH-RLHF's empty final turns): drop the record (counted, first lines named),
    stop, or keep it as an EOS-only completion (TRL's)."""
    template_mismatch: Literal["warn", "error", "prompt"] = "warn"
    """The prompt rendered alone is not a prefix of the rendered conversation: train TRL's cut (the
    prompt loses its tail) and say so, stop, or keep the generation prompt as rendered and append the
    completion's tokens (training sees what inference will)."""
    missing_eos: Literal["warn", "append", "error"] = "warn"
    """A rendered completion that ends with no EOS or end-of-turn token (GLM-4.5): say so, append EOS,
    or stop."""
    double_bos: Literal["warn", "strip", "error"] = "warn"
    """Text that already starts with the BOS the tokenizer adds (chat data rendered to text): say so,
    remove the added one, or stop."""
    response_fields: list[str] | None = None
    """Two fields holding two responses (SHP: ``[human_ref_A, human_ref_B]``), in place of chosen and
    rejected; ``preference_field`` or ``score_fields`` says which one is chosen."""
    preference_field: str | None = None
    """With ``response_fields``: the field saying which response is preferred (SHP: ``labels``)."""
    preference_values: list[str] = field(default_factory=lambda: ["1", "0"])
    """The ``preference_field`` values meaning the first response is preferred, and the second (SHP:
    ``[1, 0]``; Chatbot Arena: ``[model_a, model_b]``); any other value (a tie) drops the record."""
    score_fields: list[str] | None = None
    """Two fields scoring the pair's responses, in the order of chosen/rejected or of
    ``response_fields`` (UltraFeedback: ``[score_chosen, score_rejected]``). With ``response_fields``
    and no ``preference_field`` the higher score is chosen (equal: dropped); ``rm.margin_field=scores``
    takes their difference as the margin."""
    chat_template: str | None = None
    """A Jinja chat template, or a path to a file holding one, for tokenizers without one."""
    layout: Literal["auto", "padded", "prefix_shared", "packed"] = "auto"
    """DPO family: ``padded`` (TRL's, a row per sequence), ``prefix_shared`` (a row per pair, the prompt
    once), ``packed`` (several pairs a row); ``auto``: packed where the model's attention allows it."""
    pack_tokens: int | None = None
    """Tokens per row of the packed layout; None: the longest pair of the micro-batch."""
    cache: bool = True
    """Keep the token ids of a file or hub dataset on disk, memory-mapped, and reuse them while
    nothing that decides them changes (``preftune cache ls``); false: tokenize on every start, in memory."""
    cache_dir: str | None = None
    """Folder of the tokenized stores; None: ``$PREFTUNE_CACHE_DIR``, else ``preftune/tokenized`` in
    the Hugging Face cache (``$HF_HOME``, default ``~/.cache/huggingface``)."""
    num_proc: int | None = None
    """Processes that tokenize; None: every core, up to 8. Any number gives the same ids."""


@dataclass
class ReferenceConfig:
    strategy: Literal["auto", "none", "copy", "adapter", "precomputed"] = "auto"
    """``auto``: none for reference-free objectives, adapter with LoRA, else a frozen copy."""
    path: str | None = None
    """A different checkpoint to use as the reference (``copy`` and ``precomputed``)."""
    batch_size: int = 8
    """Pairs per forward when precomputing reference log-probs."""
    quantize: Literal["none", "int8", "nf4"] = "none"
    """A live frozen reference (``copy``, ``reference.path``, online DPO's and PPO's) held in int8 (about
    a quarter of fp32's memory) or NF4 (about an eighth) by bitsandbytes; its log-probs move by the
    rounding (docs/train.md gives the measured error)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/preftune"
    """Folder for checkpoints, logs and ``final/``; it belongs to one run."""
    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (DPO on full weights: 5e-7 to 1e-6; LoRA: about 1e-5)."""
    batch_size: int = 8
    """Pairs per micro-batch per device."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (exact: 4 x 2 equals 1 x 8)."""
    epochs: float = 1.0
    """Passes over the training pairs (fractions allowed), unless ``max_steps`` is set."""
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs``."""
    warmup_steps: int = 0
    """Steps of linear warmup (takes precedence over ``warmup_ratio``)."""
    warmup_ratio: float = 0.0
    """Warmup as a share of all steps."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW's β1."""
    adam_beta2: float = 0.999
    """AdamW's β2."""
    adam_epsilon: float = 1e-8
    """AdamW's ε."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """``adamw``: torch's. ``adamw_8bit``: bitsandbytes' AdamW with 8-bit moments (2 bytes a parameter
    instead of 8; tensors under 4096 elements keep 32-bit moments). ``paged_adamw_8bit``: the same with
    its state in paged memory that a GPU evicts to the host under pressure (on a CPU: adamw_8bit)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm to this (null: no clipping; the norm is still logged)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """``auto``: bf16 autocast on a GPU that supports it, else none."""
    seed: int = 42
    """Seed of the data order, new heads and everything random."""
    shuffle: bool = True
    """Visit the pairs in a fresh seeded order every epoch."""
    log_every: int = 10
    """Log the metrics averaged over this many steps."""
    eval_every: int | None = None
    """Evaluate on ``data.eval_path`` every N steps (and always at the end)."""
    save_every: int | None = 500
    """Checkpoint every N steps and at the last step; null: only when a signal stops the run."""
    save_total_limit: int | None = 2
    """Keep the newest N checkpoints; null keeps every one."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient: stop the run (naming step and records), or skip the step."""
    max_skipped_steps: int = 10
    """With ``nonfinite=skip``: stop once this many steps were skipped."""
    resume: bool | str = False
    """Continue from the latest checkpoint in ``output_dir`` (true), or from the checkpoint folder named."""
    overwrite: bool = False
    """Start over in an ``output_dir`` that holds an earlier run's checkpoints (they are deleted)."""
    logps_chunk_size: int | None = None
    """Completion tokens per chunk of the lm_head + log-softmax; bounds the logits memory.
    None: about 2**25 logits a chunk (220 tokens at a 152k vocabulary, 1024 at 32k)."""
    progress: bool = True
    """A progress bar on a terminal; one line per logged step otherwise."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers through accelerate: ``tensorboard``, ``wandb``, ``mlflow``, ``trackio``
    (each when installed), or ``none``. ``metrics.jsonl`` is always written."""


@dataclass
class RMConfig:
    """Bradley–Terry reward models (``preftune rm train``)."""

    margin_field: str = "margin"
    """Optional per-pair margin column m in ``−log σ(r_w − r_l − m)``; pairs without it use 0.
    ``scores``: chosen's score minus rejected's, from ``data.score_fields``."""
    center_rewards_coefficient: float | None = None
    """c in the centering term ``c · mean((r_w + r_l)²)`` (Eisenstein et al. 2023); None: off."""
    ensemble: int = 1
    """K > 1: train an ensemble of K reward models, saved as one folder that scores like one model
    (its members' rewards aggregated by ``reward.aggregate`` where it is used)."""
    ensemble_kind: Literal["full", "heads", "lora"] = "full"
    """``full``: K models, trained one after another (K× the time, K× the memory to score);
    ``heads``: K heads on one shared backbone, trained together (about 1× both, but the heads
    agree); ``lora``: K LoRA adapters, each with its own head, on one base (K× the time, one
    model's memory plus K adapters). docs/rm.md compares them."""
    bootstrap: bool = False
    """Each member trains on a bootstrap resample of the pairs (drawn with replacement); false: every
    member sees every pair, and members differ in their seed (a new head, the data order)."""


@dataclass
class PromptsConfig:
    """The prompts of the commands that sample from the policy (``online``, ``ppo``)."""

    path: str = ""
    """Any file ``train`` reads with a ``prompt`` field (text or chat messages), or a hub dataset name."""
    split: str = "train"
    """Split of a hub dataset of prompts."""
    limit: int | None = None
    """Use only the first N prompts (None: all)."""


@dataclass
class RewardConfig:
    """The reward the sampling commands optimize (``online``, ``ppo``)."""

    scorer: str = ""
    """A reward-model folder, or a function ``module:function`` / ``file.py:function``."""
    batch_size: int = 16
    """Completions per reward-model forward (or per call of a function)."""
    timeout: float | None = 600.0
    """Seconds one call of a reward function may take before the run stops naming the function and
    the batch (null: no limit; a reward model's forward is not timed)."""
    aggregate: Literal["mean", "min", "mean_minus_std"] = "mean"
    """How a reward with several members (an ensemble folder, a function answering K columns) becomes
    one: their mean, their minimum (worst case), or mean − λ·std (uncertainty-weighted)."""
    uncertainty_penalty: float = 1.0
    """λ of ``aggregate=mean_minus_std``: how many of the members' standard deviations are subtracted."""
    monitor: str = ""
    """A second reward (a held-out reward model, another ensemble, or a function) that scores the same
    samples without being trained on: logged beside the reward, to watch for overoptimization."""
    monitor_patience: int = 2
    """N: warn when the reward rose and the monitor fell at each of the last N rounds (online) or logged
    steps (PPO)."""
    monitor_noise_z: float = 2.0
    """...and the monitor's fall over those N exceeds this many standard errors of the difference of
    its two means (each mean's error from its samples' spread): a fall within chance does not warn.
    0: any fall counts."""
    stop_on_overoptimization: bool = False
    """On that warning, stop the run; ``final/`` is the policy the monitor scored best."""


def check_model(m: ModelConfig) -> None:
    need(m.lora_r >= 1, "model.lora_r", "must be >= 1")
    need(0 <= m.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)")


def check_data(d: DataConfig) -> None:
    need(d.max_length is None or d.max_length >= 2, "data.max_length", "must be >= 2")
    need(d.max_prompt_length is None or d.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
    need(d.num_proc is None or d.num_proc >= 1, "data.num_proc", "must be >= 1")
    packs = d.pack_tokens is None or (d.pack_tokens >= 2 and d.layout in ("auto", "packed"))
    need(packs, "data.pack_tokens", f"must be >= 2, for the packed layout (data.layout={d.layout})")
    need(
        d.eval_path is not None or d.eval_split == "test",
        "data.eval_split",
        "names a split of data.eval_path, which is not set (the same hub dataset's split: data.eval_path = data.path)",
    )
    if d.max_length is not None and d.max_prompt_length is not None:
        need(d.max_prompt_length < d.max_length, "data.max_prompt_length", "must be < data.max_length")
    for key, names in (("response_fields", d.response_fields), ("score_fields", d.score_fields)):
        need(names is None or len(names) == 2, f"data.{key}", f"names two fields, got {names}")
    values = d.preference_values
    need(
        len(values) == 2 and values[0] != values[1],
        "data.preference_values",
        f"two different values, got {values}",
    )
    if d.response_fields:
        need(
            bool(d.preference_field or d.score_fields),
            "data.response_fields",
            "needs data.preference_field or data.score_fields to say which response is chosen",
        )
    need(
        d.preference_field is None or bool(d.response_fields),
        "data.preference_field",
        "needs data.response_fields",
    )
    if d.chat_template and not looks_like_template(d.chat_template):
        need(
            Path(d.chat_template).is_file(),
            "data.chat_template",
            f"{d.chat_template}: no such file (give a file or the Jinja text)",
        )


def check_train(t: TrainConfig) -> None:
    need(t.learning_rate > 0, "train.learning_rate", "must be > 0")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.epochs > 0, "train.epochs", "must be > 0")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0 (or null)")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.eval_every is None or t.eval_every >= 1, "train.eval_every", "must be >= 1")
    need(t.save_every is None or t.save_every >= 1, "train.save_every", "must be >= 1")
    need(t.max_skipped_steps >= 1, "train.max_skipped_steps", "must be >= 1")
    need(t.logps_chunk_size is None or t.logps_chunk_size >= 1, "train.logps_chunk_size", "must be >= 1")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    need(t.adam_epsilon > 0, "train.adam_epsilon", "must be > 0")
    need(0 <= t.seed < 2**32, "train.seed", "must be in [0, 2**32)")
    need(
        t.save_total_limit is None or t.save_total_limit >= 1,
        "train.save_total_limit",
        "must be >= 1 (or null: keep every checkpoint)",
    )
    for name in t.report_to:
        need(
            name in (*TRACKERS, "none"),
            "train.report_to",
            f"unknown tracker '{name}'{suggest(name, TRACKERS)}; use {', '.join(TRACKERS)} or none",
        )


def check_reference(r: ReferenceConfig, m: ModelConfig) -> None:
    need(r.batch_size >= 1, "reference.batch_size", "must be >= 1")
    if r.strategy == "adapter":
        need(m.lora or m.load_in_4bit, "reference.strategy", "'adapter' needs model.lora=true")
    if r.quantize == "none":
        return
    need(
        r.strategy in ("auto", "copy"),
        "reference.quantize",
        f"applies to a live frozen reference (reference.strategy=copy or auto); '{r.strategy}' holds no "
        "reference model while training",
    )
    # With LoRA the reference is the policy with its adapters off: no second model to shrink.
    need(
        not (m.lora or m.load_in_4bit) or bool(r.path),
        "reference.quantize",
        "with LoRA the reference is the policy's own base with adapters off (no second model); "
        "quantize applies to a frozen copy of a full-weights policy, or to reference.path",
    )


def check_rm(rm: RMConfig) -> None:
    c = rm.center_rewards_coefficient
    need(
        c is None or (math.isfinite(c) and c >= 0), "rm.center_rewards_coefficient", f"must be >= 0, got {c}"
    )
    need(rm.ensemble >= 1, "rm.ensemble", f"must be >= 1 (1: one reward model), got {rm.ensemble}")


def check_sampling(prompts: PromptsConfig, reward: RewardConfig) -> None:
    need(prompts.limit is None or prompts.limit >= 1, "prompts.limit", "must be >= 1")
    need(reward.batch_size >= 1, "reward.batch_size", "must be >= 1")
    timeout = reward.timeout
    need(
        timeout is None or (math.isfinite(timeout) and timeout > 0),
        "reward.timeout",
        f"must be > 0 seconds (or null: no limit), got {timeout}",
    )
    penalty = reward.uncertainty_penalty
    need(
        math.isfinite(penalty) and penalty >= 0, "reward.uncertainty_penalty", f"must be >= 0, got {penalty}"
    )
    need(
        penalty == 1.0 or reward.aggregate == "mean_minus_std",
        "reward.uncertainty_penalty",
        f"is read only with reward.aggregate=mean_minus_std (it is {reward.aggregate})",
    )
    need(reward.monitor_patience >= 1, "reward.monitor_patience", "must be >= 1")
    need(reward.monitor_noise_z >= 0, "reward.monitor_noise_z", "must be >= 0")


def looks_like_template(value: str) -> bool:
    """Jinja text rather than a path to a file holding it."""
    return "{" in value or "\n" in value


def read_template(value: str) -> str:
    """A chat template given inline, or the contents of the file it names."""
    return value if looks_like_template(value) else Path(value).read_text(encoding="utf-8")
