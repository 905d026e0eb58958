"""Measure this machine's engine steps on a varied workload and fit the simulator's cost model.

Example: python scripts/fit_step_cost.py --records out/step_records.jsonl \
    --out configs/hardware/cpu-measured.toml

Runs the real engine (each config in --configs) over bursts, Poisson arrivals, long contexts
and shared prefixes, under both policies, recording every step's padded shape (taken right
after `schedule()`) and the wall time of `Engine.step()` (what bench_batching's clock counts).
Then fits `jaxserve.simulate.fit.fit_linear` and writes the TOML. The seed scenarios are not
in this workload: they are what the fit is validated on (docs/simulation.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from jaxserve.config import load_config, replace
from jaxserve.engine import Engine
from jaxserve.jaxutil import enable_compilation_cache
from jaxserve.request import SamplingParams
from jaxserve.simulate.fit import StepRecord, fit_linear, fit_toml, save_records
from jaxserve.simulate.shapes import ShapeOf, StepShape

# (arrival_s, prompt token ids, max_tokens)
Arrival = tuple[float, list[int], int]


def workloads(vocab: int, max_len: int, seed: int = 7) -> dict[str, list[Arrival]]:
    """Shapes the seed scenarios do not pin down: every decode bucket, long contexts, cached
    prefixes, MIXED steps from arrivals during decode."""
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(100, vocab - 100, int(n)).tolist()

    burst = [
        (0.0, ids(k), int(o))
        for k, o in zip(
            np.clip(rng.lognormal(np.log(48), 0.7, 40), 4, 300),
            rng.integers(4, 97, 40),
            strict=True,
        )
    ]
    gaps = rng.exponential(1 / 3.0, 30).cumsum()
    poisson = [  # outputs Pareto like the seed's, capped at 256 as bench_offline caps them
        (
            float(t),
            ids(np.clip(rng.lognormal(np.log(96), 0.6), 8, 400)),
            int(min(4 + rng.pareto(1.5) * 16, 256)),
        )
        for t in gaps
    ]
    long_len = min(900, max_len - 160)
    long = [(0.0, ids(long_len + 37 * i), 120) for i in range(5)]
    prefix = ids(min(256, max_len // 2))
    shared = [(0.05 * i, prefix + ids(24 + 8 * (i % 4)), 16) for i in range(16)]
    return {"burst": burst, "poisson": poisson, "long": long, "shared_prefix": shared}


def record_shapes(engine: Engine) -> list[StepShape]:
    """Append every non-idle plan's shape, in step order, to the returned list."""
    shapes: list[StepShape] = []
    shape_of = ShapeOf(engine.cfg.scheduler)
    schedule = engine.scheduler.schedule

    def recording():
        plan = schedule()
        if not plan.is_idle:
            shapes.append(shape_of(plan))
        return plan

    engine.scheduler.schedule = recording
    return shapes


def run_workload(engine: Engine, arrivals: list[Arrival], tag: str) -> list[StepRecord]:
    """Submit by arrival time on the engine's own step clock; record (shape, step seconds)."""
    schedule = engine.scheduler.schedule  # restored at the end
    shapes = record_shapes(engine)
    records, pending, clock = [], sorted(arrivals, key=lambda a: a[0]), 0.0
    policy = engine.cfg.scheduler.policy
    try:
        while pending or engine.has_work():
            while pending and (pending[0][0] <= clock or not engine.has_work()):
                _, prompt, out = pending.pop(0)
                params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
                engine.add_request(f"{tag}-{policy}-{len(pending)}", prompt, params)
            n = len(shapes)
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            clock += dt
            if len(shapes) > n:
                load = os.getloadavg()[0]
                records.append(StepRecord(shapes[-1], dt, f"{tag}/{policy}", load))
    finally:
        engine.scheduler.schedule = schedule
        if engine.scheduler.prefix_cache is not None:  # a twin reuses these KV pages
            engine.scheduler.prefix_cache.clear()
    return records


def wait_for_quiet(max_load: float | None) -> None:
    """Other people's jobs share the cores: optionally wait for the load to drop first."""
    while max_load is not None and os.getloadavg()[0] > max_load:
        time.sleep(10)


def collect(
    config: str, out: str, max_load: float | None, num_pages: int | None
) -> list[StepRecord]:
    cfg = replace(load_config(config), scheduler={"policy": "continuous"})
    if num_pages:
        cfg = replace(cfg, cache={"num_pages": num_pages})
    t0 = time.perf_counter()
    engine = Engine.from_config(cfg)
    twin = Engine(
        replace(cfg, scheduler={"policy": "static"}),
        engine.model_cfg,
        engine.tokenizer,
        engine.runner,
    )
    print(f"{config}: load + warm-up {time.perf_counter() - t0:.0f}s", flush=True)
    records: list[StepRecord] = []
    name = Path(config).stem
    jobs = workloads(engine.model_cfg.vocab_size, cfg.scheduler.max_model_len)
    for wname, arrivals in jobs.items():
        for e in (engine, twin) if wname == "burst" else (engine,):
            wait_for_quiet(max_load)
            t0 = time.perf_counter()
            recs = run_workload(e, arrivals, f"{name}/{wname}")
            save_records(recs, out, append=True)  # kept even if a later workload dies
            records += recs
            print(
                f"  {wname:14s} {e.cfg.scheduler.policy:10s} {len(recs):4d} steps "
                f"{time.perf_counter() - t0:6.1f}s  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    return records


def source_info(configs: list[str]) -> dict[str, str | float]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "configs": ", ".join(configs),
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "cpus": float(os.cpu_count() or 0),
        "load_avg_1m_after": os.getloadavg()[0],
        "script": "scripts/fit_step_cost.py",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--configs", nargs="+", default=["configs/smollm2-135m.toml", "configs/test.toml"]
    )
    ap.add_argument("--records", default="out/step_records.jsonl", help="raw steps (JSONL)")
    ap.add_argument("--out", default="configs/hardware/cpu-measured.toml", help="the fit")
    ap.add_argument("--max-load", type=float, help="wait for a lower 1-min load average first")
    ap.add_argument("--num-pages", type=int, help="override [cache] num_pages (less memory)")
    args = ap.parse_args(argv)
    enable_compilation_cache()
    Path(args.records).parent.mkdir(parents=True, exist_ok=True)
    Path(args.records).write_text("")
    records = [
        r for c in args.configs for r in collect(c, args.records, args.max_load, args.num_pages)
    ]
    report = fit_linear(records)
    Path(args.out).write_text(fit_toml(report, source_info(args.configs)))
    print(f"wrote {args.records} ({len(records)} steps) and {args.out}: r2 {report.r2:.3f}")
    for mode, s in report.by_mode.items():
        print(f"  {mode:7s} {s['steps']:5.0f} steps, mean |err| {s['mean_abs_rel_err']:.1%}")


if __name__ == "__main__":
    main()
