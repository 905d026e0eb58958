"""Request traces for the simulator: the seed's batching scenarios, Poisson arrivals, and
`bench_serving` JSONL datasets; each request is an arrival time, prompt ids and an output length.

The scenarios and the synthetic draws repeat `scripts/bench_batching.SCENARIOS` and
`scripts/bench_offline.make_prompts` draw for draw (the scripts import jax, this must not);
`tests/test_simulate.py` checks they give the very same prompts.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 49152  # SmolLM2's; only the range of the random prompt ids depends on it


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_token_ids: list[int]
    output_len: int  # the request stops by max_tokens (ignore_eos)


@dataclass(frozen=True)
class Scenario:
    """`scripts/bench_batching.Scenario`: `num_requests` prompts submitted at once."""

    name: str
    num_requests: int
    input_len: int  # fixed, or the lognormal median for "mixed"
    output_len: int  # fixed; the upper end for "uniform"; the Pareto scale for "mixed"
    lengths: str  # "identical" | "uniform" | "mixed"
    min_output: int = 8
    seed: int = 0


SCENARIOS = {
    "identical": Scenario("identical", 64, 64, 64, "identical"),
    "uniform": Scenario("uniform", 128, 64, 128, "uniform"),
    "mixed": Scenario("mixed", 128, 64, 32, "mixed"),
    "high_concurrency": Scenario("high_concurrency", 256, 32, 16, "mixed", seed=1),
}
SEED_SCENARIOS = ("uniform", "mixed", "high_concurrency")  # the seed's table


def make_prompts(
    n: int, input_len: int, output_len: int, dataset: str, vocab: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """`bench_offline.make_prompts`: 'fixed' lengths, or 'mixed' (lognormal prompts, Pareto
    outputs capped at 8x)."""
    rng = np.random.default_rng(seed)
    if dataset == "fixed":
        ins, outs = [input_len] * n, [output_len] * n
    else:
        ins = np.clip(rng.lognormal(np.log(input_len), 0.6, n), 4, 4 * input_len).astype(int)
        outs = np.clip(rng.pareto(1.5, n) * output_len / 2 + 4, 4, 8 * output_len).astype(int)
    prompts = [rng.integers(100, vocab - 100, int(k)).tolist() for k in ins]
    return prompts, [int(o) for o in outs]


def scenario_workload(sc: Scenario, vocab: int = VOCAB_SIZE) -> tuple[list[list[int]], list[int]]:
    """`bench_batching.Scenario.workload`: prompts and output lengths."""
    n = sc.num_requests
    if sc.lengths == "mixed":
        return make_prompts(n, sc.input_len, sc.output_len, "mixed", vocab, sc.seed)
    prompts, outs = make_prompts(n, sc.input_len, sc.output_len, "fixed", vocab, sc.seed)
    if sc.lengths == "uniform":
        rng = np.random.default_rng(sc.seed + 1)
        outs = rng.integers(sc.min_output, sc.output_len + 1, n).tolist()
    return prompts, outs


def scenario_trace(name: str, scale: float = 1.0, vocab: int = VOCAB_SIZE) -> list[TraceRequest]:
    """A seed scenario, every request arriving at t = 0 (`--scale` multiplies the count)."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(SCENARIOS)}")
    sc = SCENARIOS[name]
    if scale != 1.0:
        sc = dataclasses.replace(sc, num_requests=max(1, round(sc.num_requests * scale)))
    prompts, outs = scenario_workload(sc, vocab)
    return [TraceRequest(0.0, p, o) for p, o in zip(prompts, outs, strict=True)]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process of `rate` requests/s (rate <= 0: all at t = 0)."""
    if rate <= 0:
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1_000_003).exponential(1.0 / rate, n)
    return (np.cumsum(gaps) - gaps[0]).tolist()


def poisson_trace(
    n: int,
    rate: float,
    input_len: int = 64,
    output_len: int = 32,
    dataset: str = "mixed",
    seed: int = 0,
    vocab: int = VOCAB_SIZE,
) -> list[TraceRequest]:
    """`make_prompts` lengths with Poisson arrivals at `rate` requests/s."""
    prompts, outs = make_prompts(n, input_len, output_len, dataset, vocab, seed)
    times = poisson_arrivals(n, rate, seed)
    return [TraceRequest(t, p, o) for t, p, o in zip(times, prompts, outs, strict=True)]


def _word_ids(text: str, vocab: int) -> list[int]:
    # No tokenizer here (it would need the model files): one id per word, stable across runs,
    # so identical texts still share prefixes in the prefix cache.
    return [zlib.crc32(w.encode()) % vocab for w in text.split()] or [0]


def jsonl_trace(
    path: str | Path,
    rate: float = 0.0,
    default_output_len: int = 128,
    seed: int = 0,
    vocab: int = VOCAB_SIZE,
) -> list[TraceRequest]:
    """A `bench_serving` dataset: {"prompt": str | [ids]} or {"messages": [...]}, optional
    "output_len" (or "max_tokens") and, beyond bench_serving, "arrival_s"; rows without one
    arrive by Poisson at `rate` (0: all at once). Text counts one token per word."""
    rows = [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]
    times = poisson_arrivals(len(rows), rate, seed)
    trace = []
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if prompt is None:
            if "messages" not in row:
                raise ValueError(f"{path}:{i + 1}: needs 'prompt' or 'messages'")
            prompt = "\n".join(m["content"] for m in row["messages"])
        ids = list(prompt) if isinstance(prompt, list) else _word_ids(prompt, vocab)
        out = int(row.get("output_len", row.get("max_tokens", default_output_len)))
        trace.append(TraceRequest(float(row.get("arrival_s", times[i])), ids, out))
    return sorted(trace, key=lambda r: r.arrival_s)
