"""Pieces shared by the benchmarks: memory probes, Llama-style models from configs, synthetic pairs.

Each side of a benchmark runs in its own process, so peak memory is per side.
"""

from __future__ import annotations

import random
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch


def rss_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start the peak resident memory (VmHWM) afresh, so that :func:`window_peak_mib` measures what
    runs from now on and not the imports before (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_mib() -> float:
    """Peak resident memory since :func:`reset_peak` (Linux's VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return peak_mib()


def gemm_limit_gflops(size: int = 2048, tries: int = 5) -> float:
    """This machine's fp32 matmul rate now, at the current thread count: the best of a few
    ``size``-square products (GFLOP/s). The ceiling a training step's FLOP rate is measured against."""
    import time

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def machine() -> dict[str, object]:
    """What the figures were taken on: CPU model, cores, load average, package versions."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "peft", "bitsandbytes", "preftune"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "versions": versions,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class ModelShape:
    """A randomly initialised Llama-style model (untied embeddings, SwiGLU, RoPE)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def build(self, seed: int = 0) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)

    def parameters(self) -> int:
        return self.vocab * self.hidden + self.body_parameters() + self.head_parameters()

    def body_parameters(self) -> int:
        """The decoder layers' and final norm's parameters: the ones every token's forward multiplies by."""
        attention, mlp = 4 * self.hidden**2, 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp + 2 * self.hidden) + self.hidden

    def head_parameters(self) -> int:
        return self.vocab * self.hidden

    def step_flops(self, lengths: list[tuple[int, int, int]]) -> float:
        """The useful work of one training step on these (prompt, chosen, rejected) pairs, forward and
        backward, at 6 FLOPs per parameter per token: every distinct token (each prompt once) through
        the decoder, and every completion token through the lm_head. A layout that computes a prompt
        twice, or pads, or scores prompt positions does more work than this; attention's own
        quadratic term is left out (as in the usual 6N count)."""
        tokens = sum(p + c + r for p, c, r in lengths)
        scored = sum(c + r for _, c, r in lengths)
        return 6.0 * (self.body_parameters() * tokens + self.head_parameters() * scored)


MODELS = {
    "7m": ModelShape(vocab=32_000, hidden=96, layers=4, heads=4, intermediate=256),
    "60m": ModelShape(vocab=32_000, hidden=512, layers=8, heads=8, intermediate=1376),
    "128k": ModelShape(vocab=128_256, hidden=256, layers=4, heads=4, intermediate=688),
}


def case_lengths(case: str, count: int, seed: int) -> list[tuple[int, int, int]]:
    """``count`` (prompt, chosen, rejected) token lengths: ``short`` 64/64/64, ``long`` 256/64/64,
    ``ragged`` long-tailed (log-normal around 48 prompt and 32 completion tokens, capped at 512/256)."""
    if case == "short":
        return [(64, 64, 64)] * count
    if case == "long":
        return [(256, 64, 64)] * count
    rng = random.Random(seed)

    def draw(median_tokens: float, cap: int) -> int:
        return max(4, min(cap, round(rng.lognormvariate(0, 0.9) * median_tokens)))

    return [(draw(48, 512), draw(32, 256), draw(32, 256)) for _ in range(count)]


def synthetic_records(tokenizer, lengths: list[tuple[int, int, int]], seed: int) -> list[dict[str, str]]:
    """Records whose prompt tokenizes (with BOS) and whose completions tokenize (with the EOS both
    trainers append) to exactly the lengths given: words the tokenizer keeps as one token."""
    from preftune.experiments.synthetic import NEGATIVE, POSITIVE, TOPICS

    words = [
        w
        for w in sorted(set(POSITIVE + NEGATIVE + TOPICS))
        if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1
    ]
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(tokens - 1))

    records = [{"prompt": text(p), "chosen": text(c), "rejected": text(r)} for p, c, r in lengths]
    first = records[0]
    assert len(tokenizer(first["prompt"]).input_ids) == lengths[0][0], "one token per word expected"
    return records
