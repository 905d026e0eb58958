"""Simulated vs measured: the seed scenarios on the real engine (bench_batching's machinery)
and through the simulator with the measured cost model, same config, same requests.

Example: python scripts/sim_validate.py --paired --out out/sim_validate.json \
    --plot docs/img/sim_vs_measured.png
Redraw: python scripts/sim_validate.py --replot out/sim_validate.json \
    --plot docs/img/sim_vs_measured.png

Every real step's padded shape is recorded as it is planned, so the report also compares
each step's measured time with the model's price for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.config import load_config, replace
from jaxserve.engine import Engine
from jaxserve.simulate.cost import CostModel, load_linear
from jaxserve.simulate.metrics import summarize
from jaxserve.simulate.sim import simulate
from jaxserve.simulate.trace import SEED_SCENARIOS, scenario_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_batching  # noqa: E402
from fit_step_cost import record_shapes  # noqa: E402

POLICIES = ("static", "continuous")


def compare(name: str, real: dict, shapes: dict, engines: dict, cost: CostModel, scale: float):
    """Simulate the scenario for both policies; per-step and whole-run figures side by side."""
    trace = scenario_trace(name, scale)
    row: dict[str, Any] = {"scenario": name, "num_requests": len(trace)}
    for policy in POLICIES:
        sched = engines[policy].cfg.scheduler
        sim = summarize(simulate(trace, cost, sched, engines[policy].cfg.cache))
        meas = [st["end"] - st["start"] for st in real[policy]["steps"]]
        pred = [cost.step_seconds(s) for s in shapes[policy]]
        row[policy] = {
            "measured_tok_per_s": real[policy]["output_tok_per_s"],
            "simulated_tok_per_s": sim["output_tok_per_s"],
            "measured_steps": [
                real[policy][k] for k in ("prefill_steps", "decode_steps", "mixed_steps")
            ],
            "simulated_steps": [sim[k] for k in ("prefill_steps", "decode_steps", "mixed_steps")],
            "step_pairs": [
                [m, p, s.mode] for m, p, s in zip(meas, pred, shapes[policy], strict=True)
            ],
            "load_avg_1m_after": real[policy].get("load_avg_1m_after"),
        }
    for key in ("measured", "simulated"):
        c, s = row["continuous"][f"{key}_tok_per_s"], row["static"][f"{key}_tok_per_s"]
        row[f"{key}_ratio"] = c / s
    return row


def resimulate(report: dict[str, Any], cost_path: str) -> dict[str, Any]:
    """Keep a saved report's measurements, redo its simulated side with another cost model
    (the plans are the same, so the simulated steps pair with the measured ones)."""
    a = report["args"]
    cfg = replace(load_config(a["config"]), scheduler={"policy": "continuous"})
    if a.get("num_pages"):
        cfg = replace(cfg, cache={"num_pages": a["num_pages"]})
    cost = load_linear(cost_path)
    for row in report["rows"]:
        for policy in POLICIES:
            sched = replace(cfg, scheduler={"policy": policy}).scheduler
            st = simulate(scenario_trace(row["scenario"], a["scale"]), cost, sched, cfg.cache,
                          record_steps=True)  # fmt: skip
            r, sim = row[policy], summarize(st)
            r["simulated_tok_per_s"] = sim["output_tok_per_s"]
            r["simulated_steps"] = [
                sim[k] for k in ("prefill_steps", "decode_steps", "mixed_steps")
            ]
            assert len(st.steps) == len(r["step_pairs"]), "the plans differ: another config?"
            for pair, step in zip(r["step_pairs"], st.steps, strict=True):
                pair[1] = cost.step_seconds(step.shape)
        for key in ("measured", "simulated"):
            c, s = row["continuous"][f"{key}_tok_per_s"], row["static"][f"{key}_tok_per_s"]
            row[f"{key}_ratio"] = c / s
    report["args"] = {**a, "cost": cost_path, "resimulated_from": a["cost"]}
    return report


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from jaxserve.jaxutil import enable_compilation_cache

    enable_compilation_cache()
    cfg = replace(load_config(args.config), scheduler={"policy": "continuous"})
    if args.num_pages:
        cfg = replace(cfg, cache={"num_pages": args.num_pages})
    engine = Engine.from_config(cfg)
    static = (
        Engine.from_config(replace(cfg, scheduler={"policy": "static"}))
        if args.paired
        else bench_batching.static_twin(engine)
    )
    engines = {"continuous": engine, "static": static}
    cost = load_linear(args.cost)
    rows = []
    for k, name in enumerate(args.scenarios):
        trace = scenario_trace(name, args.scale)
        prompts = [t.prompt_token_ids for t in trace]
        outs = [t.output_len for t in trace]
        shapes = {p: record_shapes(e) for p, e in engines.items()}
        t0 = time.perf_counter()
        if args.paired:
            real = bench_batching.run_paired(engines, prompts, outs)
        else:  # alternate which goes first, so a slow drift in load favours neither
            order = POLICIES[:: 1 if k % 2 == 0 else -1]
            real = {p: bench_batching.run_policy(engines[p], prompts, outs) for p in order}
        for e in engines.values():  # unwrap the recorder
            del e.scheduler.schedule
        rows.append(compare(name, real, shapes, engines, cost, args.scale))
        print_row(rows[-1], f"{time.perf_counter() - t0:.0f}s load {os.getloadavg()[0]:.1f}")
    return rows


def print_row(r: dict[str, Any], note: str = "") -> None:
    print(
        f"{r['scenario']:17s} measured {r['static']['measured_tok_per_s']:6.1f} / "
        f"{r['continuous']['measured_tok_per_s']:6.1f} tok/s ({r['measured_ratio']:.2f}x)  "
        f"simulated {r['static']['simulated_tok_per_s']:6.1f} / "
        f"{r['continuous']['simulated_tok_per_s']:6.1f} ({r['simulated_ratio']:.2f}x)  {note}",
        flush=True,
    )


def plot(rows: list[dict[str, Any]], path: Path, note: str) -> None:
    """Left: throughput bars, measured vs simulated; right: every step, predicted vs measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    x = np.arange(len(rows))
    w = 0.2
    bars = [
        ("static", "measured", "#d08c3f", None),
        ("static", "simulated", "#d08c3f", "//"),
        ("continuous", "measured", "#3f7fbf", None),
        ("continuous", "simulated", "#3f7fbf", "//"),
    ]
    for k, (policy, kind, colour, hatch) in enumerate(bars):
        vals = [r[policy][f"{kind}_tok_per_s"] for r in rows]
        b = ax.bar(x + (k - 1.5) * w, vals, w, color=colour, hatch=hatch, edgecolor="white",
                   label=f"{policy}, {kind}")  # fmt: skip
        ax.bar_label(b, [f"{v:.0f}" for v in vals], fontsize=7, padding=1)
    ticks = [
        f"{r['scenario']}\nmeasured {r['measured_ratio']:.2f}x, sim {r['simulated_ratio']:.2f}x"
        for r in rows
    ]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.set_title("whole runs: continuous / static under each scenario", fontsize=10)
    ax.legend(fontsize=8, ncol=2, loc="upper left")
    ax.margins(y=0.2)
    colours = {"extend": "k", "decode": "#3f7fbf", "mixed": "#d08c3f"}
    for mode, colour in colours.items():
        pts = [
            (m, p)
            for r in rows
            for policy in POLICIES
            for m, p, md in r[policy]["step_pairs"]
            if md == mode
        ]
        if pts:
            m, p = np.array(pts).T
            ax2.scatter(1e3 * m, 1e3 * p, s=6, alpha=0.4, color=colour, label=mode)
    lim = ax2.get_xlim()[1]
    ax2.plot([0, lim], [0, lim], "k:", lw=1)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("measured step time, ms")
    ax2.set_ylabel("cost model, ms")
    ax2.set_title("every step of those runs", fontsize=10)
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"Simulator (measured cost model) vs the real engine on this CPU\n{note}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=None, help="engine TOML (default: the default model's)")
    ap.add_argument("--cost", default="configs/hardware/cpu-measured.toml")
    ap.add_argument("--scenarios", nargs="+", choices=SEED_SCENARIOS, default=list(SEED_SCENARIOS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    ap.add_argument("--num-pages", type=int, help="override [cache] num_pages (less memory)")
    ap.add_argument("--paired", action="store_true", help="own runner for static, interleaved")
    ap.add_argument("--out", default=None, help="JSON with every step")
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--replot", default=None, help="redraw from a JSON of --out")
    ap.add_argument("--resim", default=None, help="a JSON of --out, re-simulated with --cost")
    args = ap.parse_args(argv)
    if args.resim:
        report = resimulate(json.loads(Path(args.resim).read_text()), args.cost)
        for row in report["rows"]:
            print_row(row)
        if args.out:
            Path(args.out).write_text(json.dumps(report))
    elif args.replot:
        report = json.loads(Path(args.replot).read_text())
    else:
        report = {"args": vars(args), "rows": run(args)}
        report["load_avg_1m_end"] = os.getloadavg()[0]
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report))
    if args.plot:
        a = report["args"]
        note = (
            f"{a['config'] or 'configs/smollm2-135m.toml'}"
            + (f" with num_pages = {a['num_pages']}" if a.get("num_pages") else "")
            + f", scale {a['scale']}, "
            f"{'paired' if a['paired'] else 'sequential'} runs, cost {a['cost']}"
        )
        plot(report["rows"], Path(args.plot), note)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
