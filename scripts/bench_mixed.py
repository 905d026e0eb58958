"""Inter-token latency of decoding requests while a long prompt arrives: MIXED steps on vs off.

N requests decode; then one long prompt arrives. Without mixing each of its prefill steps
stalls every decoder; with mixing its chunks ride along with the decode rows. Settings run
alternately on one warmed engine (same weights, same compiled functions), so a busy
neighbour slows them alike.

Example:
  python scripts/bench_mixed.py --decoders 16 --long-prompt 2000 --mixed-step-tokens 0 96 160
(0 = mixing off: EXTEND steps of max_prefill_tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from jaxserve.config import load_config, replace
from jaxserve.engine import Engine
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.request import SamplingParams


def set_mixing(engine: Engine, step_tokens: int) -> None:
    """Switch the scheduler between settings; every bucket they use is already compiled."""
    cfg = dataclasses.replace(
        engine.scheduler.cfg,
        enable_mixed_steps=step_tokens > 0,
        mixed_step_tokens=max(step_tokens, 1),
    )
    engine.scheduler.cfg = engine.builder.cfg = cfg


def one_round(engine: Engine, args, rng, tag: str) -> dict:
    vocab = engine.model_cfg.vocab_size
    decoders = [f"{tag}-d{i}" for i in range(args.decoders)]
    times: dict[str, list[float]] = {rid: [] for rid in decoders}
    for rid in decoders:
        ids = rng.integers(100, vocab - 100, args.decode_prompt_len).tolist()
        engine.add_request(
            rid, ids, SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0)
        )

    def step() -> list:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in times and o.new_token_ids:
                times[o.request_id].append(now)
        return outs

    while min(len(t) for t in times.values()) < 3:  # all prefilled and decoding
        step()
    long_id = f"{tag}-long"
    long_ids = rng.integers(100, vocab - 100, args.long_prompt).tolist()
    modes_before = dict(
        extend=engine.stats.num_prefill_steps,
        decode=engine.stats.num_decode_steps,
        mixed=engine.stats.num_mixed_steps,
    )
    t_arrive = time.perf_counter()
    engine.add_request(
        long_id, long_ids, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    )
    ttft = None
    while ttft is None:
        for o in step():
            if o.request_id == long_id and o.new_token_ids:
                ttft = time.perf_counter() - t_arrive
    t_end = time.perf_counter()
    for _ in range(3):  # the decoders' next tokens close the gaps that span the prefill
        step()
    for rid in [*decoders, long_id]:
        engine.abort(rid)
    gaps = [
        b - a
        for t in times.values()
        for a, b in zip(t, t[1:], strict=False)
        if b > t_arrive and a < t_end
    ]
    # Decode tokens from the arrival until the long prompt's first token.
    tokens = sum(1 for t in times.values() for x in t if t_arrive < x <= t_end)
    return {
        "long_ttft_s": ttft,
        "itl_ms": [1e3 * g for g in gaps],
        "decode_tok_per_s": tokens / (t_end - t_arrive),
        "steps": {
            "extend": engine.stats.num_prefill_steps - modes_before["extend"],
            "decode": engine.stats.num_decode_steps - modes_before["decode"],
            "mixed": engine.stats.num_mixed_steps - modes_before["mixed"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--decoders", type=int, default=16)
    ap.add_argument("--decode-prompt-len", type=int, default=64)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--mixed-step-tokens", type=int, nargs="+", default=[0, 160])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config)
    cfg = replace(
        cfg,
        scheduler={
            "enable_mixed_steps": True,
            "mixed_step_tokens": max(args.mixed_step_tokens),
            "enable_prefix_cache": False,
        },
    )
    t0 = time.perf_counter()
    engine = Engine.from_config(cfg)
    print(f"load + warm-up: {time.perf_counter() - t0:.1f}s, {engine.runner.num_compiles} compiled")
    compiles = engine.runner.num_compiles
    rng = np.random.default_rng(args.seed)
    runs: dict[int, list[dict]] = {s: [] for s in args.mixed_step_tokens}
    for r in range(args.rounds):
        for s in args.mixed_step_tokens:
            set_mixing(engine, s)
            runs[s].append(one_round(engine, args, rng, f"r{r}-s{s}"))
    results = []
    print(f"{args.decoders} decoders, a {args.long_prompt}-token prompt arrives")
    print(
        "mixed_step_tokens | ITL p50 ms | ITL p99 ms | ITL max ms | long TTFT s "
        "| decode tok/s | steps E/D/M"
    )
    for s, rs in runs.items():
        itl = np.concatenate([r["itl_ms"] for r in rs])
        row = {
            "mixed_step_tokens": s,
            "mixing": s > 0,
            "itl_p50_ms": float(np.percentile(itl, 50)),
            "itl_p99_ms": float(np.percentile(itl, 99)),
            "itl_max_ms": float(itl.max()),
            "long_ttft_s": float(np.median([r["long_ttft_s"] for r in rs])),
            "decode_tok_per_s": float(np.median([r["decode_tok_per_s"] for r in rs])),
            "steps": rs[-1]["steps"],
        }
        results.append(row)
        st = row["steps"]
        print(
            f"{'off' if s == 0 else s:>17} | {row['itl_p50_ms']:10.0f} "
            f"| {row['itl_p99_ms']:10.0f} | {row['itl_max_ms']:10.0f} "
            f"| {row['long_ttft_s']:11.2f} | {row['decode_tok_per_s']:12.1f} "
            f"| {st['extend']}/{st['decode']}/{st['mixed']}"
        )
    print(f"compiles after warm-up: {engine.runner.num_compiles - compiles}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out = {
            "args": vars(args),
            "results": results,
            "rounds": {str(k): v for k, v in runs.items()},
        }
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
