"""Figures of a simulated run, named as `scripts/bench_batching.py` names them, and the
one-line report it prints.

Throughput counts from the first arrival to the last token; latencies are per request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxserve.simulate.sim import SimState

PERCENTILES = (50, 90, 99)


def _dist(values: list[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if v == v], float)  # nan: never happened
    if a.size == 0:
        return {"mean": float("nan"), **{f"p{q}": float("nan") for q in PERCENTILES}}
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES}}


def summarize(st: SimState) -> dict[str, Any]:
    wall = st.end_s - st.start_s
    done = [i for i, f in enumerate(st.finish) if f == f]
    sustained = float("nan")
    if st.sustained_end_s == st.sustained_end_s and st.sustained_end_s > st.start_s:
        sustained = st.sustained_tokens / (st.sustained_end_s - st.start_s)
    return {
        "num_requests": len(st.arrival),
        "completed": len(done),
        "rejected": st.rejected,
        "wall_s": wall,
        "output_tokens": st.output_tokens,
        "output_tok_per_s": st.output_tokens / wall if wall > 0 else float("nan"),
        "sustained_tok_per_s": sustained,  # up to the step that emptied the queue
        "request_per_s": len(done) / wall if wall > 0 else float("nan"),
        "ttft_s": _dist([st.first[i] - st.arrival[i] for i in done]),
        "itl_s": _dist(st.itl),
        "e2e_s": _dist([st.finish[i] - st.arrival[i] for i in done]),
        "slot_utilisation": st.busy_slot_steps / max(st.total_slot_steps, 1),
        "row_utilisation": st.busy_slot_steps / max(st.padded_decode_rows, 1),
        "num_slots": st.num_slots,  # every dp group's
        "dp": st.dp,
        "retractions": st.retractions,
        "prompt_tokens_run": st.prompt_tokens_run,
        "prefill_steps": st.steps_by_mode["extend"],
        "decode_steps": st.steps_by_mode["decode"],
        "mixed_steps": st.steps_by_mode["mixed"],
        "prefill_s": st.seconds_by_mode["extend"],
        "decode_s": st.seconds_by_mode["decode"],
        "mixed_s": st.seconds_by_mode["mixed"],
    }


def report_line(label: str, r: dict[str, Any]) -> str:
    """Throughput, utilisation, steps and latency percentiles (ms) on one line."""

    def ms(d: dict[str, float]) -> str:
        return "/".join(f"{1e3 * d[f'p{q}']:.0f}" for q in PERCENTILES)

    return (
        f"{label:28s} {r['output_tok_per_s']:9.1f} out tok/s (sustained "
        f"{r['sustained_tok_per_s']:7.1f})  wall {r['wall_s']:7.1f}s  slot util "
        f"{r['slot_utilisation']:.2f} (rows {r['row_utilisation']:.2f})  steps "
        f"E{r['prefill_steps']}/D{r['decode_steps']}/M{r['mixed_steps']}  retract "
        f"{r['retractions']}  TTFT {ms(r['ttft_s'])}  ITL {ms(r['itl_s'])}  "
        f"E2E {ms(r['e2e_s'])} ms p50/p90/p99"
    )
