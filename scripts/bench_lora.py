"""Decode throughput with LoRA: 32 slots each on a different adapter vs no adapter.

    python scripts/bench_lora.py [--rank 8] [--targets q_proj k_proj v_proj o_proj] [--out f.json]

Three engines of the default model: LoRA off; LoRA buffers on but every request on the base
model; every request on its own adapter (random weights: the speed does not depend on them).
Each fills all slots; then every engine in turn times `--steps` DECODE steps, `--rounds` times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxserve import lora  # noqa: E402
from jaxserve.config import load_config, replace  # noqa: E402
from jaxserve.engine import Engine  # noqa: E402
from jaxserve.request import RequestState, SamplingParams  # noqa: E402


def random_adapter(cfg, seed: int, rank: int, targets: tuple[str, ...]) -> lora.LoraAdapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(cfg.num_layers):
        for t in targets:
            fan_in, fan_out = lora.target_shape(cfg, t)
            a = rng.standard_normal((fan_in, rank), np.float32) / np.sqrt(fan_in)
            b = 0.01 * rng.standard_normal((rank, fan_out), np.float32)
            weights[layer, t] = (a, b)
    return lora.LoraAdapter(lora.LoraConfig(rank, 2.0 * rank, targets), weights)


def fill(engine: Engine, adapters: list[str | None], max_tokens: int) -> None:
    """Every slot busy decoding (request i on adapters[i]), prefills done."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(adapters):
        prompt = rng.integers(100, 20000, size=24).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, lora=name)
        engine.add_request(f"b{i}", prompt, params)
    sched = engine.scheduler
    while sched.waiting or any(r.state is not RequestState.DECODING for r in sched.running):
        engine.step()
    engine.step()


def time_steps(engine: Engine, steps: int) -> float:
    """Decode tokens per second over `steps` DECODE steps of all slots."""
    n0 = engine.stats.num_decode_steps
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    assert engine.stats.num_decode_steps - n0 == steps, "a step was not DECODE"
    return engine.num_running() * steps / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="DECODE steps per turn")
    p.add_argument("--rounds", type=int, default=5, help="turns of every mode")
    p.add_argument("--modes", nargs="+", default=["off", "base", "lora"])
    p.add_argument("--out", help="results as JSON")
    args = p.parse_args(argv)
    from jaxserve.jaxutil import enable_compilation_cache

    enable_compilation_cache()
    targets = tuple(args.targets)
    base_cfg = replace(
        load_config(ROOT / "configs/test.toml"),
        scheduler={"max_running_requests": args.slots},
        cache={"num_pages": args.slots * 8 + 64},
    )
    # One engine per mode, all alive, timed in turns: a busy shared machine drifts over
    # minutes, and turns spread that drift over every mode alike (medians reported).
    engines: dict[str, Engine] = {}
    for mode in args.modes:
        cfg = base_cfg
        if mode != "off":
            cfg = replace(
                cfg,
                enable_lora=True,
                max_loras=args.slots,
                max_lora_rank=args.rank,
                lora_target_modules=targets,
            )
        engine = Engine.from_config(cfg)
        names: list[str | None] = [None] * args.slots
        if mode == "lora":
            assert engine.lora is not None
            for i in range(args.slots):
                adapter = random_adapter(engine.model_cfg, i, args.rank, targets)
                engine.lora.load(f"a{i}", Path(f"a{i}"), adapter)
            names = [f"a{i}" for i in range(args.slots)]
        fill(engine, names, args.rounds * args.steps + 8)
        engines[mode] = engine
    compiles = {mode: e.runner.num_compiles for mode, e in engines.items()}
    rates: dict[str, list[float]] = {mode: [] for mode in engines}
    for _ in range(args.rounds):
        for mode, engine in engines.items():
            rates[mode].append(time_steps(engine, args.steps))
    results = {}
    for mode, engine in engines.items():
        assert engine.runner.num_compiles == compiles[mode]  # nothing compiled while timing
        results[mode] = {"tok_s": float(np.median(rates[mode])), "rounds": rates[mode]}
        print(
            f"{mode:5s}: {results[mode]['tok_s']:.1f} tok/s (rounds: "
            f"{' '.join(f'{r:.1f}' for r in rates[mode])})"
        )
    if "off" in results:
        # Turns of one round are seconds apart: their ratio sees the same machine load.
        for mode in [m for m in results if m != "off"]:
            pairs = zip(rates[mode], rates["off"], strict=True)
            ratio = float(np.median([x / y for x, y in pairs]))
            results[mode]["vs_off"] = ratio
            print(
                f"{mode}: {100 * (1 - ratio):.1f}% lower decode tok/s than LoRA off (median of "
                f"per-round ratios; {args.slots} slots, rank {args.rank}, {' '.join(targets)})"
            )
    if args.out:
        out = {"rank": args.rank, "targets": targets, "slots": args.slots, "results": results}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
