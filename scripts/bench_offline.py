"""Offline engine throughput (no HTTP): LLM.generate over N prompts, with a step-time breakdown.

Example: python scripts/bench_offline.py --concurrency 1 8 32 --output-len 64 --out out/offline.json
Weight formats side by side: ... --quantization none bf16 int8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxserve.config import load_config, replace
from jaxserve.engine import Engine, EngineStats
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.llm import LLM
from jaxserve.request import SamplingParams
from jaxserve.simulate.trace import make_prompts  # noqa: F401 - bench_batching imports it


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
    ap.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        help="one engine per value (none | bf16 | int8), run side by side, alternating",
    )
    ap.add_argument("--rounds", type=int, default=1, help="repeat; each variant keeps its best")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = replace(load_config(args.config), model=args.model)
    cfg = replace(cfg, scheduler={"max_running_requests": max(args.concurrency)})
    llms = {}
    for q in args.quantization:
        t0 = time.perf_counter()
        llms[q] = LLM(engine=Engine.from_config(replace(cfg, quantization=q)))
        print(f"{q}: load + warm-up {time.perf_counter() - t0:.1f}s")
    results = []
    for c in args.concurrency:
        prompts, outs = make_prompts(
            c * args.requests_per_slot,
            args.input_len,
            args.output_len,
            args.dataset,
            cfg_vocab(llms),
            args.seed,
        )
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            order = args.quantization if r % 2 == 0 else args.quantization[::-1]
            for q in order:
                llm = llms[q]
                before = llm.engine.runner.num_compiles
                res = run_once(llm, prompts, outs)
                res["compiles_during_run"] = llm.engine.runner.num_compiles - before
                if q not in best or res["output_tok_per_s"] > best[q]["output_tok_per_s"]:
                    best[q] = res
        for q, r in best.items():
            r["concurrency"], r["quantization"] = c, q
            # which attention ran: a Pallas kernel the device rejected falls back to "reference"
            r["attention_impl"] = llms[q].engine.runner.impl
            r["kernel_fallbacks"] = llms[q].engine.runner.num_kernel_fallbacks
            results.append(r)
            b = r["breakdown_s"]
            print(
                f"concurrency {c:3d} {q:5s} [{r['attention_impl']}]: "
                f"{r['output_tok_per_s']:7.1f} out tok/s, decode "
                f"{r['decode_tok_per_s']:7.1f} tok/s ({r['mean_decode_step_ms']:.1f} ms/step), "
                f"schedule {b['schedule']:.2f}s prefill {b['prefill_device']:.2f}s "
                f"decode {b['decode_device']:.2f}s post {b['postprocess']:.2f}s"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def cfg_vocab(llms: dict) -> int:
    return next(iter(llms.values())).engine.model_cfg.vocab_size


if __name__ == "__main__":
    main()
