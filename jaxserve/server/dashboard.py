"""The live slot dashboard: `GET /dashboard` (one static page, no build step) polls
`GET /v1/dashboard/state` (JSON, behind the API key like the other /v1 routes).

The engine thread only appends one small record per step (mode, slot owners, tokens) to a
bounded ring and copies counters it already keeps; the handler reads the ring and the last
`EngineSnapshot` on the event loop. Request ids are shown as short hashes, never prompts.
"""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from jaxserve.server.metrics import EngineSnapshot

HISTORY_STEPS = 240  # columns of the slots x time picture
LATENCY_SAMPLES = 512  # recent TTFT / ITL values for the percentiles shown


@dataclass(frozen=True)
class StepRecord:
    t: float  # time.time() when the step ended
    mode: str  # "extend", "decode" or "mixed"
    owners: tuple[str | None, ...]  # short id per slot, None = free
    tokens: int  # tokens generated in the step


def short_id(request_id: str) -> str:
    """A stable 6-hex-digit tag for colouring; choice suffixes ("-0") stay distinguishable."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:6]


class DashboardFeed:
    """What the engine thread leaves for the dashboard: a ring of steps and recent latencies.

    Appends happen on the engine thread and reads on the event loop; a deque's append and
    `list(deque)` are atomic under the GIL, so no lock is needed.
    """

    def __init__(self, history: int = HISTORY_STEPS):
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=history)
        self.ttft_s: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self.itl_s: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

    def record_step(self, mode: str, owners: list[str | None], tokens: int) -> None:
        tags = tuple(None if o is None else short_id(o) for o in owners)
        self.steps.append(StepRecord(time.time(), mode, tags, tokens))


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99)}


def state(feed: DashboardFeed, snap: EngineSnapshot, ready: bool) -> dict[str, Any]:
    """The JSON the page polls."""
    steps = list(feed.steps)
    now = time.time()
    recent = [s for s in steps if now - s.t <= 10.0]
    span = (recent[-1].t - recent[0].t) if len(recent) > 1 else 0.0
    tok_s = sum(s.tokens for s in recent[1:]) / span if span > 0 else 0.0
    held = round(snap.kv_usage_ratio * snap.kv_pages_total)  # by running requests
    return {
        "ready": ready,
        "time": now,
        "num_slots": len(steps[-1].owners) if steps else 0,
        "steps": [
            {"t": round(s.t, 3), "mode": s.mode, "slots": s.owners, "tokens": s.tokens}
            for s in steps
        ],
        "running": snap.num_running,
        "waiting": snap.num_waiting,
        "kv_pages": {
            "total": snap.kv_pages_total,
            "held_by_requests": held,
            "cache_only": max(snap.kv_pages_used - held, 0),  # free to evict
            "free": snap.kv_pages_total - snap.kv_pages_used,
        },
        "output_tok_per_s": round(tok_s, 1),
        "steps_total": snap.num_steps,
        "steps_by_mode": dict(zip(("extend", "decode", "mixed"), snap.steps_by_mode, strict=True)),
        "ttft": _percentiles(list(feed.ttft_s)),
        "itl": _percentiles(list(feed.itl_s)),
        "compiles": snap.num_compiles,
        "retractions": snap.num_retractions,
    }


def page_html() -> str:
    return resources.files("jaxserve.server").joinpath("dashboard.html").read_text()
