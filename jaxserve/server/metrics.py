"""Prometheus metrics: latency histograms observed by the bridge, engine state read from snapshots.

Each app owns its own registry, so several servers (tests) can live in one process. Every
name here is listed in the README's metrics table and charted in docs/grafana/jaxserve.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxserve.request import FinishReason

# No `*_created` series next to each counter and histogram: a second series per metric that
# dashboards never use (process-wide, as prometheus_client keeps the switch).
disable_created_metrics()

PREFIX = "jaxserve"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FORWARD_MODES = ("extend", "decode", "mixed")  # scheduler.ForwardMode values that run
SUCCESS_REASONS = (FinishReason.STOP, FinishReason.LENGTH)


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state copied on the engine thread after each step; scrapes read only this."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0  # held by running requests or by the prefix cache
    kv_pages_cached: int = 0  # held by the prefix cache (some also by requests)
    kv_pages_total: int = 0
    kv_usage_ratio: float = 0.0  # held by running requests / total
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens of requests admitted while the cache is on
    prefix_cache_hits: int = 0  # of those, tokens served from the cache
    num_compiles: int = 0
    num_kernel_fallbacks: int = 0  # Pallas step builds that failed and run on the reference
    num_step_functions: int = 0
    num_retractions: int = 0
    num_aborted: int = 0
    num_failed: int = 0
    num_steps: int = 0
    steps_by_mode: tuple[int, int, int] = (0, 0, 0)  # FORWARD_MODES order
    device_s_by_mode: tuple[float, float, float] = (0.0, 0.0, 0.0)


_GAUGES = {
    "num_running": ("num_requests_running", "Requests holding a decode slot."),
    "num_waiting": ("num_requests_waiting", "Requests in the waiting queue."),
    "kv_pages_used": ("kv_pages_used", "KV cache pages in use (requests + prefix cache)."),
    "kv_pages_cached": ("kv_pages_cached", "KV cache pages held by the prefix cache."),
    "kv_pages_total": ("kv_pages_total", "KV cache pages in all."),
    "kv_usage_ratio": (
        "kv_cache_usage_ratio",
        "Share of KV pages held by running requests, 0-1 (pages only the prefix cache holds "
        "are free to the scheduler).",
    ),
    "num_step_functions": (
        "step_functions",
        "Compiled step functions this config needs; compiles_total reaches it at warm-up.",
    ),
}
_COUNTERS = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens prefilled (cached ones not included)."),
    "generation_tokens": ("generation_tokens", "Tokens generated."),
    "prefix_cache_queries": (
        "prefix_cache_queries",
        "Tokens of requests looked up in the prefix cache at admission.",
    ),
    "prefix_cache_hits": ("prefix_cache_hits", "Tokens served from the prefix cache."),
    "num_compiles": ("compiles", "XLA compilations (constant after warm-up)."),
    "num_kernel_fallbacks": (
        "kernel_fallbacks",
        "Step programs whose Pallas attention failed to build and that run on the jnp "
        "reference instead (0 unless a device's compiler rejects a kernel).",
    ),
    "num_retractions": ("retractions", "Running requests retracted for lack of KV pages."),
    "num_aborted": ("aborted_requests", "Requests aborted (client gone or shutdown)."),
    "num_failed": ("failed_requests", "Requests failed by an error inside a step."),
    "num_steps": ("engine_steps", "Engine steps run."),
}


class _SnapshotCollector(Collector):
    def __init__(self, read: Callable[[], EngineSnapshot]):
        self._read = read

    def collect(self) -> Iterator[Metric]:
        snap = self._read()
        for field, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=getattr(snap, field))
        for field, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=getattr(snap, field))
        steps = CounterMetricFamily(
            f"{PREFIX}_forward_steps", "Engine steps by forward mode.", labels=["mode"]
        )
        device = CounterMetricFamily(
            f"{PREFIX}_forward_device_seconds",
            "Device time of engine steps (incl. the copy back) by forward mode.",
            labels=["mode"],
        )
        for mode, n, seconds in zip(
            FORWARD_MODES, snap.steps_by_mode, snap.device_s_by_mode, strict=True
        ):
            steps.add_metric([mode], n)
            device.add_metric([mode], seconds)
        yield steps
        yield device


class ServingMetrics:
    """Per-request latencies (observed on the engine thread) plus the snapshot collector."""

    def __init__(self, read_snapshot: Callable[[], EngineSnapshot]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between two tokens of a request.",
            buckets=TOKEN_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Arrival to last token.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests",
            "Requests refused with 429 (waiting queue full).",
            registry=self.registry,
        )
        self.success = Counter(
            f"{PREFIX}_request_success",
            "Requests finished without error, by finish reason (stop, length).",
            ["finish_reason"],
            registry=self.registry,
        )
        for reason in SUCCESS_REASONS:  # exported at 0 before the first request
            self.success.labels(reason.value)
        self.registry.register(_SnapshotCollector(read_snapshot))

    def finished(self, reason: FinishReason | None) -> None:
        if reason in SUCCESS_REASONS:
            self.success.labels(reason.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
