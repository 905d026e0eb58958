"""Static vs continuous batching on one engine, in one run, on the seed's three scenarios.

Example: python scripts/bench_batching.py --out out/batching.json --out-dir docs/img

Two `Engine`s share one `Runner` (compiled functions and KV cache), differing only in
`scheduler.policy`; one is always idle while the other runs. All requests of a scenario are
submitted at once and run greedy with `ignore_eos`, so both policies do the same token work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.batch import smallest_bucket
from jaxserve.config import EngineConfig, load_config, replace
from jaxserve.engine import Engine, EngineStats
from jaxserve.request import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import make_prompts  # noqa: E402

POLICIES = ("static", "continuous")
DECODING = ("decode", "mixed")  # step kinds that carry decode rows


@dataclass(frozen=True)
class Scenario:
    """A workload: `num_requests` prompts submitted at once, with their output lengths."""

    name: str
    lengths_text: str  # for plot titles
    num_requests: int
    input_len: int  # fixed, or the lognormal median for "mixed"
    output_len: int  # fixed; the upper end for "uniform"; the Pareto scale for "mixed"
    lengths: str  # "identical" | "uniform" (outputs uniform in [min_output, output_len]) | "mixed"
    min_output: int = 8
    seed: int = 0

    def workload(self, vocab_size: int) -> tuple[list[list[int]], list[int]]:
        n = self.num_requests
        if self.lengths == "mixed":  # lognormal prompts, Pareto(1.5) outputs capped at 8x
            return make_prompts(n, self.input_len, self.output_len, "mixed", vocab_size, self.seed)
        prompts, outs = make_prompts(
            n, self.input_len, self.output_len, "fixed", vocab_size, self.seed
        )
        if self.lengths == "uniform":
            rng = np.random.default_rng(self.seed + 1)
            outs = rng.integers(self.min_output, self.output_len + 1, n).tolist()
        return prompts, outs


# Sized for a 2-core CPU with 32 slots (decode step ~25 ms at 1 slot, ~250 ms at 32): each
# scenario takes a few minutes for both policies together.
SCENARIOS = {
    "identical": Scenario(
        "identical", "control: every request 64 in / 64 out", 64, 64, 64, "identical",
    ),
    "uniform": Scenario(
        "uniform", "prompts 64, outputs uniform in [8, 128]", 128, 64, 128, "uniform",
    ),
    "mixed": Scenario(
        "mixed", "prompts ~64 (lognormal), long-tailed outputs (Pareto, mean ~32, max 256)",
        128, 64, 32, "mixed",
    ),
    "high_concurrency": Scenario(
        "high_concurrency",
        "short chats: prompts ~32, outputs Pareto mean ~16, max 128",
        256, 32, 16, "mixed", seed=1,
    ),
}  # fmt: skip


# ---- running one policy ------------------------------------------------------------------
def static_twin(engine: Engine) -> Engine:
    """An engine with the static policy over the same runner: nothing is compiled again.

    Both schedulers think they own every KV page, so only one may run at a time, and each
    run drops its prefix cache when it ends (see `PolicyRun`).
    """
    cfg = replace(engine.cfg, scheduler={"policy": "static"})
    return Engine(cfg, engine.model_cfg, engine.tokenizer, engine.runner)


def clear_prefix_cache(engine: Engine) -> None:
    cache = getattr(engine.scheduler, "prefix_cache", None)
    if cache is not None:
        cache.clear()


class PolicyRun:
    """One policy's run of a workload, advanced one engine step at a time.

    Its clock counts only its own steps, so two runs can be interleaved step by step
    (`--paired`) and machine load then falls on both alike.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], out_lens: list[int]):
        assert not engine.has_work(), "the engine must be idle"
        clear_prefix_cache(engine)  # every run starts cold, whatever ran before
        self.engine = engine
        self.saved_stats, engine.stats = engine.stats, EngineStats(trace=[])
        self.compiles = engine.runner.num_compiles
        self.ids = [f"{engine.cfg.scheduler.policy}-{i}" for i in range(len(prompts))]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.first = [0.0] * len(self.ids)
        self.finish = [0.0] * len(self.ids)
        self.steps: list[dict[str, Any]] = []
        self.clock = 0.0  # seconds of this run's own steps
        for rid, p, o in zip(self.ids, prompts, out_lens, strict=True):
            params = SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True)
            engine.add_request(rid, p, params)

    @property
    def done(self) -> bool:
        return not self.engine.has_work()

    def step(self) -> None:
        engine = self.engine
        n_trace = len(engine.stats.trace)
        t0 = time.perf_counter()
        outputs = engine.step()
        start, self.clock = self.clock, self.clock + time.perf_counter() - t0
        for out in outputs:
            i = self.index[out.request_id]
            self.first[i] = self.first[i] or self.clock
            if out.finished:
                self.finish[i] = self.clock
        if len(engine.stats.trace) == n_trace:
            return  # an idle step
        kind, owners = engine.stats.trace[-1]
        self.steps.append(
            {
                "start": start,
                "end": self.clock,
                "kind": kind,
                "slots": [self.index.get(o, -1) if o is not None else -1 for o in owners],
                "tokens": sum(len(o.new_token_ids) for o in outputs),
                "waiting": len(engine.scheduler.waiting),
            }
        )

    def result(self) -> dict[str, Any]:
        try:
            r = summarize_run(self.engine, self.steps, self.first, self.finish, self.clock)
            r["compiles_during_run"] = self.engine.runner.num_compiles - self.compiles
            r["load_avg_1m_after"] = os.getloadavg()[0]  # other processes skew timings
            return r
        finally:
            self.engine.stats = self.saved_stats  # a shared engine keeps its own counters
            # A twin on the same runner will overwrite these pages: keep no stale entries.
            clear_prefix_cache(self.engine)


def run_policy(engine: Engine, prompts: list[list[int]], out_lens: list[int]) -> dict[str, Any]:
    """Submit everything at once, step until done; per-step and per-request timings."""
    run = PolicyRun(engine, prompts, out_lens)
    try:
        while not run.done:
            run.step()
    finally:
        result = run.result()
    return result


def run_paired(
    engines: dict[str, Engine], prompts: list[list[int]], out_lens: list[int]
) -> dict[str, dict[str, Any]]:
    """Both policies at once, alternating steps; the engines must not share a runner."""
    runs = {policy: PolicyRun(e, prompts, out_lens) for policy, e in engines.items()}
    try:
        while not all(r.done for r in runs.values()):
            for r in runs.values():
                if not r.done:
                    r.step()
    finally:
        results = {policy: r.result() for policy, r in runs.items()}
    return results


def summarize_run(
    engine: Engine,
    steps: list[dict[str, Any]],
    first: list[float],
    finish: list[float],
    wall: float,
) -> dict[str, Any]:
    s = engine.stats
    out_tokens = sum(st["tokens"] for st in steps)
    # Sustained rate: while requests were still queued, i.e. up to the step that admits the
    # last one (no final drain). Undefined when everything fit in the first admission.
    sat = next((k for k, st in enumerate(steps) if st["waiting"] == 0), len(steps) - 1)
    window = steps[: sat + 1]
    sustained = float("nan")
    if any(st["kind"] in DECODING for st in window):
        sustained = sum(st["tokens"] for st in window) / window[-1]["end"]
    e2e = np.asarray(finish)
    ttft = np.asarray(first)
    return {
        "policy": engine.cfg.scheduler.policy,
        "num_requests": len(finish),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / wall,
        "sustained_tok_per_s": sustained,
        "slot_utilisation": s.busy_slot_steps / max(s.total_slot_steps, 1),
        # Busy rows / rows computed: decode runs the smallest batch bucket holding every busy
        # slot, so idle slots above it cost nothing.
        "row_utilisation": row_utilisation(engine, steps),
        "num_slots": len(engine.scheduler.slots),
        "prefill_steps": s.num_prefill_steps,
        "decode_steps": s.num_decode_steps,
        "mixed_steps": s.num_mixed_steps,
        "prefill_device_s": s.prefill_device_s,
        "decode_device_s": s.decode_device_s,
        "mixed_device_s": s.mixed_device_s,
        # Output tok/s if every step were a full DECODE step at the run's mean decode speed
        # (tokens of DECODE steps / their time): the ceiling that prefill work lowers.
        "decode_only_tok_per_s": decode_only_rate(steps),
        "host_s": s.schedule_s + s.postprocess_s,
        "e2e_s": {"mean": float(e2e.mean()), "p50": float(np.median(e2e)), "p90": _p(e2e, 90)},
        "ttft_s": {"mean": float(ttft.mean()), "p50": float(np.median(ttft)), "p90": _p(ttft, 90)},
        "decode_buckets": decode_bucket_profile(engine, steps),
        "steps": steps,
    }


def decode_only_rate(steps: list[dict[str, Any]]) -> float:
    """Busy decode rows per second of DECODE steps at the largest busy count seen."""
    decode = [st for st in steps if st["kind"] == "decode"]
    if not decode:
        return float("nan")
    full = max(sum(r >= 0 for r in st["slots"]) for st in decode)
    times = [st["end"] - st["start"] for st in decode if sum(r >= 0 for r in st["slots"]) == full]
    return full / float(np.median(times))


def _p(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q))


def row_utilisation(engine: Engine, steps: list[dict[str, Any]]) -> float:
    buckets = engine.builder.decode_batch_buckets
    busy = rows = 0
    for st in steps:
        live = [k for k, r in enumerate(st["slots"]) if r >= 0]
        if st["kind"] in DECODING and live:
            busy += len(live)
            rows += smallest_bucket(max(live) + 1, buckets)
    return busy / max(rows, 1)


def decode_bucket_profile(engine: Engine, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per decode batch bucket: steps, mean step ms, busy slots per step, time share."""
    buckets = engine.builder.decode_batch_buckets
    rows: dict[int, list[tuple[float, int]]] = {b: [] for b in buckets}
    for st in steps:
        if st["kind"] not in DECODING:
            continue
        busy = [k for k, r in enumerate(st["slots"]) if r >= 0]
        if busy:
            rows[smallest_bucket(max(busy) + 1, buckets)].append(
                (st["end"] - st["start"], len(busy))
            )
    total = sum(t for v in rows.values() for t, _ in v) or 1e-9
    return {
        str(b): {
            "steps": len(v),
            "mean_step_ms": 1e3 * float(np.mean([t for t, _ in v])) if v else 0.0,
            "mean_busy_slots": float(np.mean([n for _, n in v])) if v else 0.0,
            "time_share": sum(t for t, _ in v) / total,
        }
        for b, v in rows.items()
    }


def run_scenarios(
    engine: Engine,
    scenarios: list[Scenario],
    warmup_requests: int = 0,
    static_engine: Engine | None = None,
) -> list[dict[str, Any]]:
    """Both policies on each scenario; `engine` must be the continuous one.

    Without `static_engine` a static twin shares `engine`'s runner and the policies run one
    after the other; with one (its own runner) they run interleaved, step by step.
    """
    paired = static_engine is not None
    engines = {"continuous": engine, "static": static_engine or static_twin(engine)}
    vocab = engine.model_cfg.vocab_size
    if warmup_requests:  # touch the KV pages and caches once, outside any measurement
        prompts, outs = make_prompts(warmup_requests, 32, 8, "fixed", vocab, 99)
        for e in engines.values():
            run_policy(e, prompts, outs)
    results = []
    for k, sc in enumerate(scenarios):
        prompts, outs = sc.workload(vocab)
        if paired:
            runs = run_paired(engines, prompts, outs)
        else:
            # Alternate which policy goes first, so slow drift in machine load favours neither.
            order = ("continuous", "static")[:: 1 if k % 2 == 0 else -1]
            runs = {policy: run_policy(engines[policy], prompts, outs) for policy in order}
        for policy, r in runs.items():
            print(
                f"{sc.name:17s} {policy:10s} {r['output_tok_per_s']:6.1f} out tok/s "
                f"(sustained {r['sustained_tok_per_s']:6.1f})  slot util "
                f"{r['slot_utilisation']:.2f} (rows {r['row_utilisation']:.2f})  "
                f"wall {r['wall_s']:6.1f}s  "
                f"mean e2e {r['e2e_s']['mean']:6.1f}s",
                flush=True,
            )
        c, s = runs["continuous"], runs["static"]
        results.append(
            {
                "scenario": asdict(sc),
                "paired": paired,
                "input_tokens": sum(map(len, prompts)),
                "output_tokens": sum(outs),
                "ratio": c["output_tok_per_s"] / s["output_tok_per_s"],
                "sustained_ratio": c["sustained_tok_per_s"] / s["sustained_tok_per_s"],
                "runs": runs,
            }
        )
        ceiling = c["decode_only_tok_per_s"] / s["output_tok_per_s"]
        results[-1]["decode_only_ceiling_ratio"] = ceiling
        print(
            f"{sc.name:17s} continuous / static = {results[-1]['ratio']:.2f}x "
            f"(sustained {results[-1]['sustained_ratio']:.2f}x; decode-only ceiling "
            f"{ceiling:.2f}x; {c['mixed_steps']} mixed steps)",
            flush=True,
        )
    return results


# ---- plots -------------------------------------------------------------------------------
def plot_timeline(result: dict[str, Any], path: Path, note: str = "") -> None:
    """Slots x time for both policies, one colour per request, white = idle slot."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = ListedColormap(plt.get_cmap("tab20").colors)
    runs = result["runs"]
    t_max = max(runs[p]["wall_s"] for p in POLICIES)
    fig, axes = plt.subplots(2, 1, figsize=(13, 6.8), sharex=True)
    for ax, policy in zip(axes, POLICIES, strict=True):
        run = runs[policy]
        steps = run["steps"]
        n_slots = run["num_slots"]
        edges = np.array([steps[0]["start"]] + [st["end"] for st in steps])
        grid = np.array([st["slots"] for st in steps], dtype=float).T  # [slots, steps]
        # Spread consecutive requests (often neighbours in slots) over unrelated colours.
        grid = np.ma.masked_where(grid < 0, (grid * 7) % 20)
        ax.pcolormesh(edges, np.arange(n_slots + 1), grid, cmap=colours, vmin=0, vmax=20)
        # Prefill steps: a black bar above the slots (grey: MIXED, decode rows rode along).
        for st in steps:
            if st["kind"] in ("prefill", "mixed"):
                c = "k" if st["kind"] == "prefill" else "0.6"
                ax.axvspan(st["start"], st["end"], ymin=0.955, ymax=1.0, color=c, lw=0)
        ax.set_ylim(0, n_slots * 1.047)
        ax.set_xlim(0, t_max)
        ax.set_ylabel("slot")
        ax.set_title(
            f"{policy}: {run['output_tok_per_s']:.1f} output tok/s, slot utilisation "
            f"{run['slot_utilisation']:.0%}, done in {run['wall_s']:.0f} s",
            loc="left",
            fontsize=11,
        )
    clock = "this policy's own step time" if result.get("paired") else "since all requests arrived"
    axes[-1].set_xlabel(f"time (s, {clock})  -  columns are engine steps")
    sc = result["scenario"]
    n_slots = runs["static"]["num_slots"]
    fig.suptitle(
        f"{sc['name']}: {sc['num_requests']} requests at once on {n_slots} slots; "
        f"{sc['lengths_text']}\ncolour = request, white = idle slot, "
        f"black / grey bar on top = prefill / mixed step; "
        f"continuous/static = {result['ratio']:.2f}x" + (f"\n{note}" if note else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(results: list[dict[str, Any]], path: Path, note: str = "") -> None:
    """Bars per scenario: throughput (with the ratio), slot utilisation, mean latency."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tick(r: dict[str, Any], with_ratio: bool) -> str:
        name = r["scenario"]["name"].replace("_", "\n")
        if not with_ratio:
            return name
        sustained = r["sustained_ratio"]
        return f"{name}\n{r['ratio']:.2f}x" + (
            "" if sustained != sustained else f" ({sustained:.2f}x)"
        )

    x = np.arange(len(results))
    w = 0.38
    colour = {"static": "#d08c3f", "continuous": "#3f7fbf"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 5))
    panels = [
        ("output tokens / s (higher is better)", lambda run: run["output_tok_per_s"]),
        ("decode slot utilisation (busy / all)", lambda run: run["slot_utilisation"]),
        ("mean end-to-end latency, s (lower is better)", lambda run: run["e2e_s"]["mean"]),
    ]
    for ax, (title, value) in zip(axes, panels, strict=True):
        for k, policy in enumerate(POLICIES):
            vals = [value(r["runs"][policy]) for r in results]
            bars = ax.bar(x + (k - 0.5) * w, vals, w, label=policy, color=colour[policy])
            fmt = "{:.0%}" if "utilisation" in title else "{:.0f}"
            ax.bar_label(bars, [fmt.format(v) for v in vals], fontsize=8, padding=1)
        ax.set_xticks(x, [tick(r, ax is axes[0]) for r in results], fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    top = max(r["runs"][p]["output_tok_per_s"] for r in results for p in POLICIES)
    axes[0].set_ylim(0, 1.3 * top)
    axes[0].legend(loc="upper left", ncol=2, fontsize=9)
    fig.suptitle(
        "Static vs continuous batching: same engine, same requests (all at once).\n"
        "Under the throughput bars: continuous / static over the whole run, and (while requests "
        "were still queued, i.e. without the final drain)" + (f"\n{note}" if note else ""),
        fontsize=10.5,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    results: list[dict[str, Any]], out_dir: Path, prefix: str = "batching", note: str = ""
) -> list[Path]:
    """One timeline per scenario and the summary; `note` (config, commit) goes in titles."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        paths.append(out_dir / f"{prefix}_timeline_{r['scenario']['name']}.png")
        plot_timeline(r, paths[-1], note)
    paths.append(out_dir / f"{prefix}_summary.png")
    plot_summary(results, paths[-1], note)
    return paths


def run_note(machine: dict[str, Any], scheduler: dict[str, Any]) -> str:
    buckets = "/".join(str(b) for b in scheduler["prefill_buckets"])
    return (
        f"{machine['cpus']}-core CPU, {scheduler['max_running_requests']} slots, prefill "
        f"buckets {buckets}, commit {machine['commit']}"
    )


def machine_info() -> dict[str, Any]:
    import jax

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "jaxserve", "kernels", "configs"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return {
        "commit": commit,
        "uncommitted_engine_files": [line[3:] for line in status if line.strip()],
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=None, help="TOML config (default: the default model's)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every request count")
    ap.add_argument("--out-dir", default="docs/img", help="where the PNGs go")
    ap.add_argument("--out", default=None, help="JSON results (with every step)")
    ap.add_argument(
        "--prefill-buckets", type=int, nargs="+", default=None, help="override the config's"
    )
    ap.add_argument("--prefix", default="batching", help="PNG file name prefix")
    ap.add_argument(
        "--paired",
        action="store_true",
        help="give static its own runner and interleave the two runs step by step",
    )
    ap.add_argument("--replot", default=None, help="redraw the PNGs from a JSON of --out")
    args = ap.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        note = run_note(report["machine"], report["scheduler"])
        for path in write_outputs(report["results"], Path(args.out_dir), args.prefix, note):
            print(f"wrote {path}")
        return

    from jaxserve.jaxutil import enable_compilation_cache

    enable_compilation_cache()
    cfg: EngineConfig = load_config(args.config)
    if args.model:
        cfg = replace(cfg, model=args.model)
    cfg = replace(cfg, scheduler={"policy": "continuous"})
    if args.prefill_buckets:
        buckets = tuple(sorted(args.prefill_buckets))
        cfg = replace(
            cfg, scheduler={"prefill_buckets": buckets, "max_prefill_tokens": buckets[-1]}
        )
    info = machine_info()
    t0 = time.perf_counter()
    engine = Engine.from_config(cfg)
    static_engine = None
    if args.paired:
        static_engine = Engine.from_config(replace(cfg, scheduler={"policy": "static"}))
    print(f"load + warm-up: {time.perf_counter() - t0:.1f}s", flush=True)
    scenarios = [SCENARIOS[n] for n in args.scenarios]
    if args.scale != 1.0:
        scenarios = [
            replace_scenario(sc, max(1, round(sc.num_requests * args.scale))) for sc in scenarios
        ]
    results = run_scenarios(
        engine, scenarios, cfg.scheduler.max_running_requests, static_engine=static_engine
    )
    note = run_note(info, asdict(cfg.scheduler))
    for path in write_outputs(results, Path(args.out_dir), args.prefix, note):
        print(f"wrote {path}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"args": vars(args), "machine": info, "model": cfg.model}
        meta["scheduler"] = asdict(cfg.scheduler)
        Path(args.out).write_text(json.dumps({**meta, "results": results}))
        print(f"wrote {args.out}")


def replace_scenario(sc: Scenario, num_requests: int) -> Scenario:
    import dataclasses

    return dataclasses.replace(sc, num_requests=num_requests)


if __name__ == "__main__":
    main()
