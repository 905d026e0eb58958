"""Offline engine throughput (no HTTP): LLM.generate over N prompts, with a step-time breakdown.

Example: python scripts/bench_offline.py --concurrency 1 8 32 --output-len 64 --out out/offline.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxserve.config import load_config, replace
from jaxserve.engine import Engine, EngineStats
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams


def make_prompts(n: int, input_len: int, output_len: int, dataset: str, vocab: int, seed: int):
    """Synthetic token prompts; 'mixed' draws long-tailed lengths around the given means."""
    rng = np.random.default_rng(seed)
    if dataset == "fixed":
        ins, outs = [input_len] * n, [output_len] * n
    else:
        ins = np.clip(rng.lognormal(np.log(input_len), 0.6, n), 4, 4 * input_len).astype(int)
        outs = np.clip(rng.pareto(1.5, n) * output_len / 2 + 4, 4, 8 * output_len).astype(int)
    prompts = [rng.integers(100, vocab - 100, int(k)).tolist() for k in ins]
    return prompts, [int(o) for o in outs]


def run_once(llm: LLM, prompts, out_lens) -> dict:
    engine = llm.engine
    engine.stats = EngineStats()
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in out_lens]
    t0 = time.perf_counter()
    outs = llm.generate_tokens(prompts, params)
    wall = time.perf_counter() - t0
    s = engine.stats
    n_out = sum(len(o.token_ids) for o in outs)
    decode_tokens = n_out - len(outs)  # the first token of each request comes from prefill
    return {
        "num_requests": len(outs),
        "wall_s": wall,
        "output_tokens": n_out,
        "prompt_tokens": sum(map(len, prompts)),
        "output_tok_per_s": n_out / wall,
        "total_tok_per_s": (n_out + sum(map(len, prompts))) / wall,
        "decode_tok_per_s": decode_tokens / max(s.decode_device_s, 1e-9),
        "decode_steps": s.num_decode_steps,
        "prefill_steps": s.num_prefill_steps,
        "mean_decode_step_ms": 1e3 * s.decode_device_s / max(s.num_decode_steps, 1),
        "breakdown_s": {
            "schedule": s.schedule_s,
            "prefill_device": s.prefill_device_s,
            "decode_device": s.decode_device_s,
            "postprocess": s.postprocess_s,
        },
        "slot_utilisation": s.busy_slot_steps / max(s.total_slot_steps, 1),
        "compiles_during_run": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument(
        "--requests-per-slot",
        type=int,
        default=1,
        help="requests per unit of concurrency (all submitted at once)",
    )
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dataset", choices=["fixed", "mixed"], default="fixed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = replace(load_config(args.config), model=args.model)
    cfg = replace(cfg, scheduler={"max_running_requests": max(args.concurrency)})
    t0 = time.perf_counter()
    llm = LLM(engine=Engine.from_config(cfg))
    print(f"load + warm-up: {time.perf_counter() - t0:.1f}s")
    results = []
    for c in args.concurrency:
        prompts, outs = make_prompts(
            c * args.requests_per_slot,
            args.input_len,
            args.output_len,
            args.dataset,
            llm.engine.model_cfg.vocab_size,
            args.seed,
        )
        before = llm.engine.runner.num_compiles
        r = run_once(llm, prompts, outs)
        r["compiles_during_run"] = llm.engine.runner.num_compiles - before
        r["concurrency"] = c
        results.append(r)
        b = r["breakdown_s"]
        print(
            f"concurrency {c:3d}: {r['output_tok_per_s']:7.1f} out tok/s, decode "
            f"{r['decode_tok_per_s']:7.1f} tok/s ({r['mean_decode_step_ms']:.1f} ms/step), "
            f"schedule {b['schedule']:.2f}s prefill {b['prefill_device']:.2f}s "
            f"decode {b['decode_device']:.2f}s post {b['postprocess']:.2f}s"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
