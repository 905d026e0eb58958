"""Matmul variants side by side at SmolLM2-135M's real shapes: float32, bfloat16, int8 (+ quant).

Example: python scripts/bench_matmul.py --out out/bench_matmul.json
Each (shape, rows) cell compiles every variant, then times them interleaved (the order rotates
each repetition) and keeps the median, so load from other processes hits all variants alike.
Inputs are always float32 activations `x [B, K]`; every variant's conversion cost is included:
  f32        x @ w                                     (XLA picks YNNPACK from 2 rows, Eigen at 1)
  f32_eigen  x @ w compiled with YNNPACK off           (compiler option, this jit only)
  bf16       jaxserve.quant.dense, bf16 w: bf16(x) . w -> float32 accumulate
  int8       jaxserve.quant.dense, int8 w: per-row absmax quantize x, s8 . s8 -> s32, rescale
  int8_dot   the s8 . s8 -> s32 dot alone, x quantized beforehand (the quantization's cost)
  int8_1row  int8 without padding one row to two (XNNPACK refuses matrix-vector dots)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import quant

# name -> (K, N, matmuls per decode step). A body cell runs one matmul per layer over 30
# distinct weights in one jit, as the unrolled model does: a single weight would sit in cache
# and hide the memory traffic that dominates at few rows.
LAYERS = 30
SHAPES = {
    "wq/wo 576x576": (576, 576, 60),
    "wk/wv 576x192": (576, 192, 60),
    "gate/up 576x1536": (576, 1536, 60),
    "down 1536x576": (1536, 576, 30),
    "lm_head 576x49152": (576, 49152, 1),
}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
VARIANTS = ("f32", "f32_eigen", "bf16", "int8", "int8_dot", "int8_1row")
SHIPPED = ("f32", "bf16", "int8")  # the candidates for a bucket; the rest explain them
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
DOT = (((1,), (0,)), ((), ()))


def int8_dot(xq: jax.Array, q: jax.Array) -> jax.Array:
    return jax.lax.dot_general(xq, q, DOT, preferred_element_type=jnp.int32)


def variant_fns(x: jax.Array, ws: tuple[jax.Array, ...]) -> dict:
    """name -> (compiled fn, args): x [B, K] float32 times each w [K, N] of `ws`."""
    qws = tuple(quant.quantize_weight(w) for w in ws)
    xq = quant.quantize_rows(x)[0]
    if x.shape[0] == 1:
        xq = jnp.pad(xq, ((0, 1), (0, 0)))  # as quant.dense does
    each = lambda f: lambda x, ws: tuple(f(x, w) for w in ws)  # noqa: E731
    unpadded = lambda x, w: quant.dense(x, w, pad_one_row=False)  # noqa: E731
    specs = {
        "f32": (each(jnp.matmul), (x, ws), None),
        "f32_eigen": (each(jnp.matmul), (x, ws), NO_YNN),
        "bf16": (each(quant.dense), (x, tuple(w.astype(jnp.bfloat16) for w in ws)), None),
        "int8": (each(quant.dense), (x, qws), None),
        "int8_dot": (each(int8_dot), (xq, tuple(w.q for w in qws)), None),
        "int8_1row": (each(unpadded), (x, qws), None),
    }
    fns = {}
    for v in VARIANTS:
        if v == "int8_1row" and x.shape[0] != 1:
            continue  # identical to int8 from two rows up
        fn, args, opts = specs[v]
        fns[v] = (jax.jit(fn).lower(*args).compile(opts), args)
    return fns


def time_cell(fns: dict, budget_s: float, min_reps: int, max_reps: int) -> dict:
    """Median seconds per variant over interleaved repetitions."""
    first = {}
    for v, (fn, args) in fns.items():
        jax.block_until_ready(fn(*args))  # warm-up
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[v] = time.perf_counter() - t0
    reps = int(np.clip(budget_s / max(sum(first.values()), 1e-6), min_reps, max_reps))
    times = {v: [] for v in fns}
    order = list(fns)
    for r in range(reps):
        for v in order[r % len(order) :] + order[: r % len(order)]:
            fn, args = fns[v]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[v].append(time.perf_counter() - t0)
    return {v: (statistics.median(ts), reps) for v, ts in times.items()}


def step_totals(results: list[dict], rows: list[int]) -> list[dict]:
    """Per row count: each shipped variant's ms for the 30 layers' matmuls and the LM head."""
    totals = []
    for b in rows:
        row: dict = {"rows": b}
        for v in SHIPPED:
            per = {r["shape"]: r["ms"] for r in results if r["rows"] == b and r["variant"] == v}
            if len(per) < len(SHAPES):
                continue
            row[f"{v}_body"] = sum(SHAPES[s][2] * ms for s, ms in per.items() if "lm" not in s)
            row[f"{v}_head"] = per["lm_head 576x49152"]
        if len(row) > 1:
            totals.append(row)
    return totals


def threshold(totals: list[dict], part: str, fast: str, slow: str) -> int | None:
    """Smallest row count from which `fast` beats `slow` at every measured count above it."""
    best = None
    for row in reversed(totals):
        if row[f"{fast}_{part}"] >= row[f"{slow}_{part}"]:
            break
        best = row["rows"]
    return best


def cpu_info() -> dict:
    flags, model = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": model or platform.processor(), "cores": os.cpu_count(), "flags": keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timing per cell")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=41)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    info = {
        "cpu": cpu_info(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": os.getloadavg(),
    }
    print(f"cpu: {info['cpu']['model']}, {info['cpu']['cores']} cores")
    print(f"flags: {' '.join(info['cpu']['flags'])}")
    print(f"jax {info['jax']}, loadavg {info['loadavg_start']}", flush=True)
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    results = []
    for shape in args.shapes:
        k, n, _ = SHAPES[shape]
        num = 1 if shape.startswith("lm_head") else LAYERS
        ws = tuple(
            jnp.asarray(rng.standard_normal((k, n), np.float32) / np.sqrt(k)) for _ in range(num)
        )
        print(f"\n{shape}: ms per matmul (GFLOP/s), median over {num} weights", flush=True)
        print(f"{'rows':>5} " + " ".join(f"{v:>17}" for v in VARIANTS) + "  best")
        for b in args.rows:
            x = jnp.asarray(rng.standard_normal((b, k), np.float32))
            cell = time_cell(variant_fns(x, ws), args.budget, args.min_reps, args.max_reps)
            cell = {v: (sec / num, reps) for v, (sec, reps) in cell.items()}  # per matmul
            for v, (sec, reps) in cell.items():
                gflops = 2 * b * k * n / sec / 1e9
                results.append(
                    {"shape": shape, "k": k, "n": n, "rows": b, "variant": v, "ms": sec * 1e3,
                     "gflops": gflops, "reps": reps}
                )  # fmt: skip
            cols = [
                f"{cell[v][0] * 1e3:8.3f} ({2 * b * k * n / cell[v][0] / 1e9:5.0f})"
                if v in cell
                else f"{'-':>17}"
                for v in VARIANTS
            ]
            shipped = {v: cell[v][0] for v in SHIPPED}
            print(f"{b:>5} " + " ".join(cols) + f"  {min(shipped, key=shipped.get)}", flush=True)

    totals = step_totals(results, args.rows)
    if totals:
        print("\none step's matmuls, ms: body = 30 layers (7 matmuls each), head = lm_head")
        for row in totals:
            print(
                f"{row['rows']:>5} "
                + "  ".join(f"{k}={v:8.2f}" for k, v in row.items() if k != "rows")
            )
        for part in ("body", "head"):
            for fast, slow in (("int8", "f32"), ("bf16", "f32"), ("bf16", "int8")):
                r = threshold(totals, part, fast, slow)
                info[f"{fast}_over_{slow}_min_rows_{part}"] = r
                print(f"{part}: {fast} beats {slow} from {r} rows up (at every count measured)")
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall {info['wall_s']:.0f} s, loadavg {info['loadavg_end']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({**info, "results": results, "step": totals}, indent=1)
        )


if __name__ == "__main__":
    main()
