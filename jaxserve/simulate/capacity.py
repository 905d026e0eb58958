"""Capacity at a latency target: the highest Poisson arrival rate whose TTFT p99 stays under a
bound, found by bisection over simulated runs, and the concurrent users that rate holds.

"Concurrent users" is Little's law: arrival rate x mean time in the system (E2E), i.e. the
mean number of requests in flight, queued or running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.simulate.cost import CostModel
from jaxserve.simulate.metrics import summarize
from jaxserve.simulate.sim import simulate
from jaxserve.simulate.trace import TraceRequest, poisson_trace


@dataclass(frozen=True)
class CapacityResult:
    rate: float  # requests/s, the highest found meeting the target (0: not even `lo`)
    ttft_p99_s: float
    concurrent_users: float  # rate x mean E2E
    output_tok_per_s: float
    slot_utilisation: float
    runs: int  # simulations it took


def run_at_rate(
    rate: float,
    cost: CostModel,
    scheduler: SchedulerConfig,
    cache: CacheConfig,
    make_trace: Callable[[float], list[TraceRequest]],
    dp: int = 1,
) -> dict[str, Any]:
    return summarize(simulate(make_trace(rate), cost, scheduler, cache, dp=dp))


def max_rate_at_ttft(
    cost: CostModel,
    scheduler: SchedulerConfig,
    cache: CacheConfig,
    ttft_p99_s: float = 1.0,
    make_trace: Callable[[float], list[TraceRequest]] | None = None,
    lo: float = 0.05,
    hi: float = 1.0,
    rel_tol: float = 0.05,
    dp: int = 1,
) -> CapacityResult:
    """Bisect the rate in [lo, hi] (hi doubled until it fails) to `rel_tol`.

    The default trace: 2,000 requests of the seed's "mixed" lengths (prompts ~64, Pareto
    outputs mean ~32), which is long enough for the queue to settle at a given rate. With
    `dp` groups, each has `scheduler`'s slots and `cache`'s pages.
    """
    if make_trace is None:

        def make_trace(rate: float) -> list[TraceRequest]:
            return poisson_trace(2000, rate, input_len=64, output_len=32, dataset="mixed")

    runs = 0

    def ok(rate: float) -> tuple[bool, dict[str, Any]]:
        nonlocal runs
        runs += 1
        r = run_at_rate(rate, cost, scheduler, cache, make_trace, dp)
        return r["ttft_s"]["p99"] <= ttft_p99_s and r["rejected"] == 0, r

    good, best = ok(lo)
    if not good:  # e.g. static batching: a request arriving mid-batch waits for all of it
        return CapacityResult(0.0, best["ttft_s"]["p99"], 0.0, 0.0, 0.0, runs)
    while True:
        passed, r = ok(hi)
        if not passed:
            break
        lo, best, hi = hi, r, hi * 2
    while (hi - lo) / lo > rel_tol:
        mid = (lo + hi) / 2
        passed, r = ok(mid)
        if passed:
            lo, best = mid, r
        else:
            hi = mid
    return CapacityResult(
        rate=lo,
        ttft_p99_s=best["ttft_s"]["p99"],
        concurrent_users=lo * best["e2e_s"]["mean"],
        output_tok_per_s=best["output_tok_per_s"],
        slot_utilisation=best["slot_utilisation"],
        runs=runs,
    )
