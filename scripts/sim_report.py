"""The projections of docs/simulation.md: the seed scenarios on other hardware, and the users
each setup holds at a TTFT p99 target. No device needed; takes a minute or two.

Example: python scripts/sim_report.py --out out/sim_report.json --img-dir docs/img

Setups: this CPU (measured cost model) and Llama-3-8B on one H100 and on a TPU v5e-8 (tp=8),
roofline costs. Variants: static, continuous without MIXED steps, continuous with them. The
scheduler config is the default (configs/smollm2-135m.toml) unless --config says otherwise.

--dp-study: the TPU v5e-8 split into data-parallel groups instead (tp=8, tp=4 x dp=2,
tp=2 x dp=4, tp=1 x dp=8), each group with the config's slots and its own KV pages: the seed
scenarios and the capacity at --ttft-p99 with --slots slots per group (JSON only, no plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxserve.config import EngineConfig, load_config, replace
from jaxserve.simulate.capacity import max_rate_at_ttft, run_at_rate
from jaxserve.simulate.cost import CostModel, load_linear
from jaxserve.simulate.hardware import load_chip, load_model_shape
from jaxserve.simulate.metrics import summarize
from jaxserve.simulate.roofline import RooflineCost
from jaxserve.simulate.shapes import StepShape
from jaxserve.simulate.sim import simulate
from jaxserve.simulate.trace import SEED_SCENARIOS, poisson_trace, scenario_trace

VARIANTS = {  # name -> scheduler overrides
    "static": {"policy": "static"},
    "continuous": {"policy": "continuous", "enable_mixed_steps": False},
    "continuous+mixed": {"policy": "continuous", "enable_mixed_steps": True},
}


CPU = "CPU (SmolLM2-135M, measured)"


@dataclass(frozen=True)
class Setup:
    """A cost model for one group's part of a step, and the number of groups."""

    cost: CostModel
    dp: int = 1


def setups(measured: str) -> dict[str, Setup]:
    llama = load_model_shape("llama3-8b")
    return {
        CPU: Setup(load_linear(measured)),
        "H100 (Llama-3-8B)": Setup(RooflineCost(load_chip("h100"), llama)),
        "TPU v5e-8 (Llama-3-8B, tp=8)": Setup(RooflineCost(load_chip("tpu-v5e"), llama, tp=8)),
    }


def dp_setups(page_size: int) -> tuple[dict[str, Setup], dict[str, str]]:
    """The v5e-8's 8 chips as tp x dp, and the splits whose groups cannot hold the weights
    (label -> why)."""
    llama, chip = load_model_shape("llama3-8b"), load_chip("tpu-v5e")
    fit, unfit = {}, {}
    for tp in (8, 4, 2, 1):
        cost = RooflineCost(chip, llama, tp=tp, dp=8 // tp)
        label = f"TPU v5e-8 (Llama-3-8B, tp={tp} x dp={8 // tp})"
        try:
            cost.kv_pages(page_size)
        except ValueError as exc:
            unfit[label] = str(exc)
            print(f"{label}: left out, {exc}")
            continue
        fit[label] = Setup(cost, 8 // tp)
    return fit, unfit


def target_for(setup: str, ttft: float, cpu_ttft: float) -> float:
    # A 256-token prompt alone takes ~1 s to prefill on this CPU: 1 s p99 is out of reach.
    return cpu_ttft if setup == CPU else ttft


def config_for(base: EngineConfig, cost: CostModel, slots: int | None) -> EngineConfig:
    cfg = base
    if slots is not None and slots != cfg.scheduler.max_running_requests:
        # Decode buckets 1, 4, 16, 32, 64, 128 below the slot count (plus all slots, always).
        buckets = tuple(b for b in (1, 4, 16, 32, 64, 128) if b < slots)
        sched = {"max_running_requests": slots, "decode_batch_buckets": buckets}
        cfg = replace(cfg, scheduler=sched)
    if isinstance(cost, RooflineCost):
        cfg = replace(cfg, cache={"num_pages": cost.kv_pages(cfg.cache.page_size)})
    return cfg


# Representative steps: (label, shape), contexts ~128 keys per decode row.
EXAMPLE_STEPS = [
    ("DECODE 1 row", StepShape("decode", 1, 1, 128, 128)),
    ("DECODE 32 rows", StepShape("decode", 32, 32, 32 * 128, 128)),
    ("EXTEND 512 tokens (8 prompts of 64)", StepShape("extend", prefill_seqs=8,
        prefill_tokens=512, prefill_tokens_padded=512, prefill_pairs=8 * 64 * 65 // 2)),
    ("MIXED 32 rows + 128 tokens", StepShape("mixed", 32, 32, 32 * 128, 128, prefill_seqs=2,
        prefill_tokens=128, prefill_tokens_padded=128, prefill_pairs=2 * 64 * 65 // 2)),
]  # fmt: skip


def step_costs(setups_: dict[str, Setup]) -> dict[str, dict[str, float]]:
    """Milliseconds of a few typical steps under each cost model (one group's part)."""
    table = {
        name: {label: 1e3 * s.cost.step_seconds(shape) for label, shape in EXAMPLE_STEPS}
        for name, s in setups_.items()
    }
    for setup, row in table.items():
        print(f"{setup:30s} " + "  ".join(f"{k}: {v:7.1f} ms" for k, v in row.items()))
    return table


def scenario_table(base: EngineConfig, setups_: dict[str, Setup]) -> list[dict[str, Any]]:
    rows = []
    for setup, one in setups_.items():
        cost, dp = one.cost, one.dp
        cfg = config_for(base, cost, None)
        for name in SEED_SCENARIOS:
            trace = scenario_trace(name)
            runs = {
                v: summarize(
                    simulate(trace, cost, replace(cfg, scheduler=o).scheduler, cfg.cache, dp=dp)
                )
                for v, o in VARIANTS.items()
            }
            rows.append({"setup": setup, "dp": dp, "scenario": name, "runs": runs})
            s = runs["static"]["output_tok_per_s"]
            print(
                f"{setup:30s} {name:17s} "
                + "  ".join(f"{v} {r['output_tok_per_s']:8.1f}" for v, r in runs.items())
                + f"  ratio {runs['continuous']['output_tok_per_s'] / s:.2f}x / "
                f"{runs['continuous+mixed']['output_tok_per_s'] / s:.2f}x",
                flush=True,
            )
    return rows


def capacity_table(
    base: EngineConfig,
    setups_: dict[str, Setup],
    ttft: float,
    cpu_ttft: float,
    slot_counts: list[int],
) -> list[dict[str, Any]]:
    """Max rate at the TTFT target per setup, slot count (per group) and variant."""
    rows = []
    for setup, one in setups_.items():
        cost, dp = one.cost, one.dp
        target = target_for(setup, ttft, cpu_ttft)
        for slots in slot_counts[:1] if setup == CPU else slot_counts:
            cfg = config_for(base, cost, slots)
            for v, o in VARIANTS.items():
                sched = replace(cfg, scheduler=o).scheduler
                t0 = time.perf_counter()
                r = max_rate_at_ttft(cost, sched, cfg.cache, target, dp=dp)
                rows.append({"setup": setup, "dp": dp, "slots": slots, "variant": v,
                             "target_s": target, **dataclasses.asdict(r)})  # fmt: skip
                print(
                    f"{setup:30s} {slots:4d} slots {v:17s} {r.rate:8.2f} req/s  "
                    f"{r.concurrent_users:7.1f} users  {r.output_tok_per_s:9.1f} tok/s  "
                    f"TTFT p99 {r.ttft_p99_s:.2f}s  ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
    return rows


def ttft_curves(
    base: EngineConfig,
    setups_: dict[str, Setup],
    slots: int,
    ttft: float,
    cpu_ttft: float,
    points: int = 8,
) -> dict[str, Any]:
    """TTFT p99 against arrival rate, for the plot: up to 1.3x the continuous capacity."""
    curves: dict[str, Any] = {}
    for setup, one in setups_.items():
        cost, dp = one.cost, one.dp
        cfg = config_for(base, cost, slots)
        target = target_for(setup, ttft, cpu_ttft)
        cap = max_rate_at_ttft(cost, cfg.scheduler, cfg.cache, target, dp=dp).rate

        def trace(rate: float):
            return poisson_trace(2000, rate, input_len=64, output_len=32, dataset="mixed")

        rates = [cap * 1.3 * (k + 1) / points for k in range(points)]
        curves[setup] = {
            v: [
                (
                    rate,
                    run_at_rate(
                        rate, cost, replace(cfg, scheduler=o).scheduler, cfg.cache, trace, dp
                    )["ttft_s"]["p99"],
                )
                for rate in rates
            ]
            for v, o in VARIANTS.items()
        }
    return curves


def plot(report: dict[str, Any], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    rows = report["scenarios"]
    setups_ = list(dict.fromkeys(r["setup"] for r in rows))
    fig, axes = plt.subplots(1, len(setups_), figsize=(5 * len(setups_), 4.6), sharey=True)
    colour = {"static": "#d08c3f", "continuous": "#3f7fbf", "continuous+mixed": "#2a9d5c"}
    for ax, setup in zip(np.atleast_1d(axes), setups_, strict=True):
        mine = [r for r in rows if r["setup"] == setup]
        x = np.arange(len(mine))
        for k, v in enumerate(VARIANTS):
            ratios = [
                r["runs"][v]["output_tok_per_s"] / r["runs"]["static"]["output_tok_per_s"]
                for r in mine
            ]
            b = ax.bar(x + (k - 1) * 0.27, ratios, 0.27, color=colour[v], label=v)
            ax.bar_label(b, [f"{q:.2f}" for q in ratios], fontsize=7, padding=1)
        ax.set_xticks(x, [r["scenario"].replace("_", "\n") for r in mine], fontsize=9)
        ax.set_title(setup, fontsize=10)
        ax.axhline(1.0, color="k", lw=0.6)
    np.atleast_1d(axes)[0].set_ylabel("output tok/s relative to static")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle("Simulated: the seed's scenarios, same scheduler, different step costs "
                 "(seed claims 1.5x / 3x / 2.5x)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    paths.append(img_dir / "sim_projection.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    curves = report.get("ttft_curves")
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.2))
        for ax, (setup, by_variant) in zip(np.atleast_1d(axes), curves.items(), strict=True):
            for v, pts in by_variant.items():
                r, t = np.array(pts).T
                ax.plot(r, t, "o-", ms=3, color=colour[v], label=v)
            target = target_for(setup, report["target_s"], report["cpu_target_s"])
            ax.axhline(target, color="k", ls=":", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel("arrival rate, requests/s (Poisson)")
            ax.set_title(setup, fontsize=10)
        np.atleast_1d(axes)[0].set_ylabel("TTFT p99, s")
        np.atleast_1d(axes)[0].legend(fontsize=8)
        fig.suptitle(f"TTFT p99 vs load, {report['curve_slots']} slots, 'mixed' lengths "
                     "(prompts ~64, outputs Pareto mean ~32)", fontsize=10)  # fmt: skip
        fig.tight_layout()
        paths.append(img_dir / "sim_ttft_vs_rate.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def dp_study(base: EngineConfig, ttft: float, slots: list[int], out: str | None) -> None:
    """The v5e-8 split into dp groups: step prices, seed scenarios, capacity."""
    fit, unfit = dp_setups(base.cache.page_size)
    report = {
        "scheduler": dataclasses.asdict(base.scheduler),
        "kv_pages_per_group": {
            k: config_for(base, s.cost, None).cache.num_pages for k, s in fit.items()
        },
        "left_out": unfit,
        "step_ms": step_costs(fit),
        "scenarios": scenario_table(base, fit),
        "capacity": capacity_table(base, fit, ttft, ttft, slots),
        "target_s": ttft,
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=None, help="engine TOML (default: the default model's)")
    ap.add_argument("--measured", default="configs/hardware/cpu-measured.toml")
    ap.add_argument("--ttft-p99", type=float, default=1.0, help="target, s (accelerators)")
    ap.add_argument("--cpu-ttft-p99", type=float, default=5.0, help="target, s (this CPU)")
    ap.add_argument("--slots", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--out", default=None)
    ap.add_argument("--img-dir", default=None)
    ap.add_argument("--replot", default=None, help="redraw from a JSON of --out")
    ap.add_argument("--dp-study", action="store_true", help="the v5e-8 as tp x dp groups")
    args = ap.parse_args(argv)
    if args.dp_study:
        dp_study(load_config(args.config), args.ttft_p99, args.slots[:1], args.out)
        return
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
    else:
        base = load_config(args.config)
        chosen = setups(args.measured)
        report = {
            "scheduler": dataclasses.asdict(base.scheduler),
            "step_ms": step_costs(chosen),
            "scenarios": scenario_table(base, chosen),
            "capacity": capacity_table(base, chosen, args.ttft_p99, args.cpu_ttft_p99, args.slots),
            "curve_slots": args.slots[0],
            "target_s": args.ttft_p99,
            "cpu_target_s": args.cpu_ttft_p99,
            "ttft_curves": ttft_curves(
                base, chosen, args.slots[0], args.ttft_p99, args.cpu_ttft_p99
            ),
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    if args.img_dir:
        for p in plot(report, Path(args.img_dir)):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
