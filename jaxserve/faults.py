"""Test-only fault injection: make every n-th device step fail, to soak the error paths.

`jaxserve serve` wraps the engine's runner in `FaultInjector` after warm-up when the
environment variable `JAXSERVE_INJECT_FAULT_EVERY=n` is set (never by default). The step's
requests then fail the way a real device error fails them (`Engine._fail`: HTTP 500 with
code "engine_error"; the others keep going), which is what `scripts/soak.py` checks.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "JAXSERVE_INJECT_FAULT_EVERY"


class InjectedFault(RuntimeError):
    """Raised by `FaultInjector` in place of a device step."""


class FaultInjector:
    """A runner whose `run` raises `InjectedFault` on every `every`-th call; the rest of the
    runner (warm-up, slot permutes, counters) is the wrapped one's."""

    def __init__(self, runner: Any, every: int):
        if every < 1:
            raise ValueError(f"{ENV} must be >= 1, got {every}")
        self.runner = runner
        self.every = every
        self.calls = 0
        self.num_injected = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls % self.every == 0:
            self.num_injected += 1
            raise InjectedFault(f"injected fault #{self.num_injected} ({ENV}={self.every})")
        return self.runner.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def from_env() -> int:
    """The step period asked for by the environment; 0 = no faults."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return 0
    try:
        every = int(value)
    except ValueError:
        raise ValueError(f"{ENV}={value!r} is not an integer") from None
    if every < 0:
        raise ValueError(f"{ENV}={every} must be >= 0")
    return every
