"""Attention kernel microbenchmark: time, bytes moved, GB/s and share of peak HBM bandwidth.

Example: python scripts/bench_kernels.py --preset llama3-8b --batch 8 --context 4096 --out k.json
CPU smoke: python scripts/bench_kernels.py --impl reference --batch 2 --context 256
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kernels

PRESETS = {  # name: (query heads, KV heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "smollm2": (9, 3, 64),
}
# Peak HBM bandwidth in bytes/s by substring of `device_kind`, first match wins.
PEAK_BW = [
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100", 2.0e12),
    ("v5 lite", 8.2e11),
    ("v5e", 8.2e11),
    ("v5p", 2.76e12),
    ("v5", 2.76e12),
    ("v6 lite", 1.64e12),
    ("v6e", 1.64e12),
]


def peak_bandwidth(device: jax.Device) -> float | None:
    """None for CPUs and for accelerators missing from the table."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    return next((bw for key, bw in PEAK_BW if key.lower() in kind.lower()), None)


@dataclasses.dataclass
class Row:
    op: str
    impl: str
    ms_median: float
    ms_min: float
    bytes: int
    gbps: float
    peak_fraction: float | None


def _time(fn, args, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _cache(rng, batch: int, context: int, page_size: int, kv_heads: int, head_dim: int, dtype):
    """Random K/V pages and a shuffled page table giving each sequence `context` tokens."""
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq + 1
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    table = rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    return k, v, jnp.asarray(table, jnp.int32)


def decode_case(args, rng, dtype):
    """One query per sequence over `context` cached tokens."""
    heads, kv_heads, head_dim = PRESETS[args.preset]
    k, v, table = _cache(rng, args.batch, args.context, args.page_size, kv_heads, head_dim, dtype)
    q = jnp.asarray(rng.standard_normal((args.batch, heads, head_dim), np.float32), dtype)
    lengths = jnp.full((args.batch,), args.context, jnp.int32)
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * args.batch * args.context * kv_heads * head_dim * itemsize
    qo_bytes = 2 * q.size * itemsize
    return (q, k, v, table, lengths), kv_bytes + qo_bytes, {}


def extend_case(args, rng, dtype):
    """`--extend-tokens` new tokens per sequence at the end of `context` tokens (K/V written)."""
    heads, kv_heads, head_dim = PRESETS[args.preset]
    new, block_q = min(args.extend_tokens, args.context), args.block_q
    k, v, table = _cache(rng, args.batch, args.context, args.page_size, kv_heads, head_dim, dtype)
    blocks = -(-new // block_q)
    pos = np.full((args.batch, blocks * block_q), -1, np.int32)
    pos[:, :new] = np.arange(args.context - new, args.context)
    block_seq = np.repeat(np.arange(args.batch, dtype=np.int32), blocks)
    tokens = pos.size
    q = jnp.asarray(rng.standard_normal((tokens, heads, head_dim), np.float32), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    # Lower bound: each sequence's K/V read once; a flash kernel re-reads it per query block.
    kv_bytes = 2 * args.batch * args.context * kv_heads * head_dim * itemsize
    qo_bytes = 2 * args.batch * new * heads * head_dim * itemsize
    inputs = (q, k, v, table, jnp.asarray(block_seq), jnp.asarray(pos.reshape(-1)))
    return inputs, kv_bytes + qo_bytes, {"block_q": block_q}


def run(args) -> list[Row]:
    device = jax.devices()[0]
    peak = peak_bandwidth(device)
    dtype = jnp.dtype(args.dtype)
    head_dim = PRESETS[args.preset][2]
    rng = np.random.default_rng(0)
    ops = {"decode": (decode_case, kernels.paged_attention)}
    ops["extend"] = (extend_case, kernels.extend_attention)
    rows = []
    for op in args.ops:
        make, entry = ops[op]
        inputs, nbytes, extra = make(args, rng, dtype)
        for impl in args.impl:
            fn = jax.jit(
                functools.partial(
                    entry,
                    scale=head_dim**-0.5,
                    sliding_window=args.sliding_window,
                    soft_cap=args.soft_cap,
                    impl=impl,
                    **extra,
                )
            )
            times = _time(fn, inputs, args.warmup, args.iters)
            ms = float(np.median(times))
            gbps = nbytes / (ms * 1e-3) / 1e9
            frac = None if peak is None else gbps * 1e9 / peak
            rows.append(Row(op, impl, ms, float(min(times)), nbytes, gbps, frac))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--extend-tokens", type=int, default=512, help="new tokens per sequence")
    p.add_argument("--block-q", type=int, default=64)
    p.add_argument("--ops", nargs="+", choices=("decode", "extend"), default=["decode", "extend"])
    p.add_argument(
        "--impl",
        type=lambda s: s.split(","),
        default=None,
        help="comma list of reference,pallas,interpret (default: by platform)",
    )
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, else bfloat16")
    p.add_argument("--sliding-window", type=int, default=None)
    p.add_argument("--soft-cap", type=float, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    device = jax.devices()[0]
    if args.impl is None:
        args.impl = ["reference"] if device.platform == "cpu" else ["reference", "pallas"]
    if args.dtype is None:  # float32 is the faster one on XLA:CPU
        args.dtype = "float32" if device.platform == "cpu" else "bfloat16"
    for impl in args.impl:
        kernels.resolve_impl(impl)  # raises on a typo before anything is built

    rows = run(args)
    peak = peak_bandwidth(device)
    print(
        f"device: {device.device_kind} ({device.platform}), {args.dtype}; peak HBM: "
        f"{'n/a' if peak is None else f'{peak / 1e12:.2f} TB/s'}"
    )
    print(
        f"{'op':<8}{'impl':<11}{'ms (median)':>12}{'ms (min)':>10}{'MB':>10}{'GB/s':>9}"
        f"{'% peak':>8}"
    )
    for r in rows:
        frac = "n/a" if r.peak_fraction is None else f"{100 * r.peak_fraction:.1f}"
        print(
            f"{r.op:<8}{r.impl:<11}{r.ms_median:>12.3f}{r.ms_min:>10.3f}"
            f"{r.bytes / 1e6:>10.2f}{r.gbps:>9.1f}{frac:>8}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {
            "device_kind": device.device_kind,
            "platform": device.platform,
            "peak_hbm_bytes_per_s": peak,
            "bytes_model": "decode: K+V of every cached token + q + out; extend: each "
            "sequence's K+V read once + q + out of the new tokens (a lower bound)",
            "config": config,
            "results": [dataclasses.asdict(r) for r in rows],
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
