"""`jaxserve simulate`: run a trace through the real scheduler under a step-cost model and print
what `scripts/bench_batching.py` prints; `fit` refits a measured model, `capacity` finds the
arrival rate a TTFT p99 target allows.

  jaxserve simulate --scenario mixed                       # both policies, CPU-measured costs
  jaxserve simulate --scenario all --hardware h100 --model llama3-8b
  jaxserve simulate --poisson 10000 --rate 3 --policy continuous --no-mixed --out out/sim.json
  jaxserve simulate --jsonl prompts.jsonl --rate 2 --config configs/smollm2-135m.toml
  jaxserve simulate capacity --hardware tpu-v5e --tp 8 --model llama3-8b --ttft-p99 1
  jaxserve simulate --hardware tpu-v5e --tp 4 --dp 2 --model llama3-8b   # 2 groups of 4 chips
  jaxserve simulate fit --records out/step_records.jsonl --out configs/hardware/cpu-measured.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxserve.config import EngineConfig, load_config, replace
from jaxserve.simulate.capacity import max_rate_at_ttft
from jaxserve.simulate.cost import CostModel, load_linear
from jaxserve.simulate.fit import fit_linear, fit_toml, load_records
from jaxserve.simulate.hardware import HARDWARE_DIR, load_chip, load_model_shape
from jaxserve.simulate.metrics import report_line, summarize
from jaxserve.simulate.roofline import RooflineCost
from jaxserve.simulate.sim import simulate
from jaxserve.simulate.trace import (
    SCENARIOS,
    SEED_SCENARIOS,
    TraceRequest,
    jsonl_trace,
    poisson_trace,
    scenario_trace,
)

DEFAULT_COST = str(HARDWARE_DIR / "cpu-measured.toml")


def build_cost(args: argparse.Namespace) -> CostModel:
    """`--hardware CHIP --model SHAPE [--tp N] [--dp M]` (roofline), else the `--cost` fit."""
    if args.hardware:
        chip, model = load_chip(args.hardware), load_model_shape(args.model)
        return RooflineCost(chip, model, args.tp, args.dp)
    return load_linear(args.cost)


def build_setup(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[CostModel, EngineConfig]:
    """The cost model and config; a setup that cannot exist (more chips than the spec has,
    weights that do not fit) is a usage error with the numbers."""
    if args.dp < 1:
        parser.error(f"--dp {args.dp}: at least 1 group")
    try:
        cost = build_cost(args)
        cfg = build_config(args, cost)
    except ValueError as exc:
        parser.error(str(exc))
    slots = args.dp * cfg.scheduler.max_running_requests
    where = (
        f"{cost.chip.name} x {cost.total_chips} (tp={cost.group_chips} x dp={cost.dp})"
        if isinstance(cost, RooflineCost)
        else f"{getattr(cost, 'name', type(cost).__name__)}, dp={args.dp}"
    )
    print(f"{where}: {slots} slots, {cfg.cache.num_pages} KV pages per group", file=sys.stderr)
    return cost, cfg


def build_config(args: argparse.Namespace, cost: CostModel) -> EngineConfig:
    """The engine TOML's [scheduler] and [cache], then the flags."""
    cfg = load_config(args.config)
    sched: dict[str, Any] = {}
    if args.slots is not None:
        sched["max_running_requests"] = args.slots
    if args.mixed_step_tokens is not None:
        sched["mixed_step_tokens"] = args.mixed_step_tokens
    if args.prefill_buckets:
        buckets = tuple(sorted(args.prefill_buckets))
        sched |= {"prefill_buckets": buckets, "max_prefill_tokens": buckets[-1]}
    if args.decode_buckets:
        sched["decode_batch_buckets"] = tuple(sorted(args.decode_buckets))
    if args.max_model_len is not None:
        sched["max_model_len"] = args.max_model_len
    if args.max_waiting is not None:
        sched["max_waiting"] = args.max_waiting
    if args.no_mixed:
        sched["enable_mixed_steps"] = False
    if args.no_prefix_cache:
        sched["enable_prefix_cache"] = False
    cfg = replace(cfg, scheduler=sched) if sched else cfg
    pages = args.num_pages
    if pages is None and isinstance(cost, RooflineCost):  # KV memory of the chips simulated
        pages = cost.kv_pages(cfg.cache.page_size)
    return replace(cfg, cache={"num_pages": pages}) if pages else cfg


def build_traces(args: argparse.Namespace) -> dict[str, list[TraceRequest]]:
    if args.jsonl:
        return {Path(args.jsonl).stem: jsonl_trace(args.jsonl, args.rate, args.output_len)}
    if args.poisson:
        return {
            f"poisson_{args.rate:g}rps": poisson_trace(
                args.poisson, args.rate, args.input_len, args.output_len, args.dataset, args.seed
            )
        }
    names = SEED_SCENARIOS if args.scenario == "all" else (args.scenario,)
    return {n: scenario_trace(n, args.scale) for n in names}


def cmd_run(args: argparse.Namespace, cost: CostModel, cfg: EngineConfig) -> int:
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, trace in build_traces(args).items():
        runs = {}
        for policy in args.policy:
            sched = dataclasses.replace(cfg.scheduler, policy=policy)
            t = time.perf_counter()
            runs[policy] = summarize(simulate(trace, cost, sched, cfg.cache, dp=args.dp))
            runs[policy]["sim_seconds"] = time.perf_counter() - t
            print(report_line(f"{name} {policy}", runs[policy]), flush=True)
        results[name] = {"runs": runs}
        if {"static", "continuous"} <= set(runs):
            c, s = runs["continuous"], runs["static"]
            ratio = c["output_tok_per_s"] / s["output_tok_per_s"]
            results[name]["ratio"] = ratio
            print(f"{name} continuous / static = {ratio:.2f}x", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"simulated in {elapsed:.2f}s", file=sys.stderr)
    if args.out:
        report = {
            "args": vars(args),
            "cost": describe(cost),
            "dp": args.dp,  # groups, each with the scheduler's slots and the cache's pages
            "scheduler": dataclasses.asdict(cfg.scheduler),
            "cache": dataclasses.asdict(cfg.cache),
            "results": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def describe(cost: CostModel) -> dict[str, Any]:
    if isinstance(cost, RooflineCost):
        return {
            "roofline": dataclasses.asdict(cost.chip),
            "model": cost.model.name,
            "tp": cost.tp,
            "dp": cost.dp,
            "chips": cost.total_chips,
        }
    return {"model": type(cost).__name__, **dataclasses.asdict(cost)}  # type: ignore[arg-type]


def cmd_capacity(args: argparse.Namespace, cost: CostModel, cfg: EngineConfig) -> int:
    for policy in args.policy:
        sched = dataclasses.replace(cfg.scheduler, policy=policy)
        r = max_rate_at_ttft(cost, sched, cfg.cache, args.ttft_p99, dp=args.dp)
        print(
            f"{policy:10s} {r.rate:7.2f} req/s at TTFT p99 {r.ttft_p99_s:.2f}s: "
            f"{r.concurrent_users:6.1f} concurrent users, {r.output_tok_per_s:8.1f} out tok/s, "
            f"slot util {r.slot_utilisation:.2f} ({r.runs} runs)",
            flush=True,
        )
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    report = fit_linear(load_records(args.records))
    Path(args.out).write_text(fit_toml(report, {"records": args.records}))
    print(f"wrote {args.out}: {report.num_steps} steps, r2 {report.r2:.3f}")
    for mode, s in report.by_mode.items():
        print(f"  {mode:7s} {s['steps']:5.0f} steps, mean |err| {s['mean_abs_rel_err']:.1%}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="engine TOML whose [scheduler] and [cache] to use")
    p.add_argument("--policy", nargs="+", choices=("static", "continuous"))
    p.add_argument("--no-mixed", action="store_true", help="enable_mixed_steps = false")
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--slots", type=int, help="max_running_requests")
    p.add_argument("--mixed-step-tokens", type=int)
    p.add_argument("--prefill-buckets", type=int, nargs="+")
    p.add_argument("--decode-buckets", type=int, nargs="+")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-waiting", type=int)
    p.add_argument("--num-pages", type=int, help="KV pages (roofline default: chip memory)")
    p.add_argument("--cost", default=DEFAULT_COST, help="fitted cost TOML ([linear])")
    p.add_argument("--hardware", help="chip spec (configs/hardware/NAME.toml): roofline costs")
    p.add_argument("--model", default="llama3-8b", help="model shape for --hardware")
    p.add_argument(
        "--tp", type=int, default=0, help="chips per dp group (tensor parallel); 0 = the spec's"
    )
    p.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data-parallel groups, each with --slots slots, the KV pages and --tp chips of one",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jaxserve simulate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    _model_args(ap)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--scenario", default="all", choices=["all", *SCENARIOS])
    src.add_argument("--poisson", type=int, metavar="N", help="N requests, Poisson arrivals")
    src.add_argument("--jsonl", help="a bench_serving JSONL dataset")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s (0: all at once)")
    ap.add_argument("--scale", type=float, default=1.0, help="scenario request-count factor")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dataset", choices=("fixed", "mixed"), default="mixed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON results")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        p = argparse.ArgumentParser(prog="jaxserve simulate fit")
        p.add_argument("--records", required=True, help="JSONL of scripts/fit_step_cost.py")
        p.add_argument("--out", default=DEFAULT_COST)
        return cmd_fit(p.parse_args(argv[1:]))
    if argv[:1] == ["capacity"]:
        p = argparse.ArgumentParser(prog="jaxserve simulate capacity")
        _model_args(p)
        p.add_argument("--ttft-p99", type=float, default=1.0, help="seconds")
        args = p.parse_args(argv[1:])
        args.policy = args.policy or ["continuous"]
        return cmd_capacity(args, *build_setup(args, p))
    ap = build_parser()
    args = ap.parse_args(argv)
    args.policy = args.policy or ["static", "continuous"]
    return cmd_run(args, *build_setup(args, ap))


if __name__ == "__main__":
    sys.exit(main())
