"""Where a decode step's time goes: the full step vs its parts, each jitted alone, same shapes.

Example: python scripts/profile_step.py --batch 1 8 32 --context 256 --out out/profile.json
Parts: weights only (all matmuls, attention replaced by identity), paged attention over the
context for all layers, KV write, lm_head, sampling (greedy and top-p). Times are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from jaxserve.config import load_config
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.models import llama
from jaxserve.runner import resolve_dtype
from jaxserve.sampling import SamplingRows, sample
from jaxserve.weights import load_model


def timeit(fn, *args, reps: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rows_for(b: int, vocab: int, greedy: bool) -> SamplingRows:
    f = lambda v: jnp.full((b,), v, jnp.float32)  # noqa: E731
    return SamplingRows(
        f(0.0 if greedy else 0.8),
        jnp.zeros((b,), jnp.int32),
        f(0.9),
        f(0.0),
        f(1.0),
        f(0.0),
        f(0.0),
        jnp.arange(b, dtype=jnp.uint32),
        jnp.zeros((b, vocab), bool),
        jnp.zeros((b, vocab), jnp.int32),
    )


def profile(model, b: int, ctx: int, page_size: int, dtype) -> dict:
    cfg = model.config
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), model.params)
    num_pages = b * (ctx // page_size) + 1
    kv = llama.init_kv_cache(cfg, num_pages, page_size, dtype)
    page_table = jnp.arange(b * (ctx // page_size), dtype=jnp.int32).reshape(b, -1)
    positions = jnp.full((b,), ctx - 1, jnp.int32)
    tokens = jnp.arange(b, dtype=jnp.int32) + 100
    slot_mapping = page_table[:, -1] * page_size + (ctx - 1) % page_size
    scale = llama.softmax_scale(cfg)

    def attend(q, kp, vp):
        return kernels.paged_attention(q, kp, vp, page_table, positions + 1, scale=scale)

    def full_step(p, kv):
        hidden, kv = llama.forward(p, cfg, kv, tokens, positions, slot_mapping, attend)
        return llama.lm_head(p, hidden), kv

    # The cache is donated, as in the engine: otherwise every layer's KV write copies it.
    step_fn = jax.jit(full_step, donate_argnums=(1,))
    state = {"kv": kv}

    def step(p, _):
        logits, state["kv"] = step_fn(p, state["kv"])
        return logits

    weights = jax.jit(
        lambda p, kv: llama.forward(
            p, cfg, kv, tokens, positions, slot_mapping, lambda q, kp, vp: q
        )[0]
    )
    q = jnp.ones((b, cfg.num_heads, cfg.head_dim), dtype)
    attn = jax.jit(lambda kv: sum(attend(q, k, v) for k, v in zip(kv.k, kv.v, strict=True)))
    hidden = jnp.ones((b, cfg.hidden_size), dtype)
    head = jax.jit(lambda p: llama.lm_head(p, hidden))
    logits = head(params)
    samp = jax.jit(lambda lg, r: sample(lg, r, positions).tokens)
    return {
        "batch": b,
        "context": ctx,
        "step_ms": 1e3 * timeit(step, params, None),
        "weights_ms": 1e3 * timeit(weights, params, state["kv"]),
        "attention_ms": 1e3 * timeit(attn, state["kv"]),
        "lm_head_ms": 1e3 * timeit(head, params),
        "sample_greedy_ms": 1e3 * timeit(samp, logits, rows_for(b, cfg.vocab_size, True)),
        "sample_top_p_ms": 1e3 * timeit(samp, logits, rows_for(b, cfg.vocab_size, False)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, nargs="+", default=[512])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config)
    model = load_model(cfg.model)
    results = []
    for ctx in args.context:
        for b in args.batch:
            r = profile(model, b, ctx, cfg.cache.page_size, resolve_dtype(cfg.dtype))
            results.append(r)
            print(
                "  ".join(
                    f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                ),
                flush=True,
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=2)
    main()
